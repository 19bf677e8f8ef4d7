#!/usr/bin/env bash
# Every GPU check in one prepared run, for a borrowed GPU machine whose python3 already has
# torch, triton, transformers and peft (and no network, so no install step).
#
#   bash scripts/gpu_check.sh prepare        # here, once: copies the tokenizer into .gpu/
#   bash scripts/gpu_check.sh tests          # there: the `gpu` tests (a few minutes)
#   bash scripts/gpu_check.sh bench-quick    # there: the benchmark at reduced sizes (~4 min)
#   bash scripts/gpu_check.sh bench-full     # there: the issue's full sizes (longer)
#
# Carry `.gpu` to the GPU machine. Results go to $OUT (the device tool's folder) when set,
# else bench/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
py="${PYTHON:-python3}"

case "${1:-}" in
prepare)
    # The bench's random 1B model uses the embedded default model's tokenizer; the GPU
    # machine cannot install the package that ships it, so the tokenizer files travel.
    src=$(.venv/bin/python -c "from adapterhub_server.base_model import resolve_base_model; print(resolve_base_model(None).path)")
    mkdir -p .gpu/tokenizer
    cp "$src"/tokenizer.json "$src"/tokenizer_config.json .gpu/tokenizer/
    [ -f "$src/special_tokens_map.json" ] && cp "$src/special_tokens_map.json" .gpu/tokenizer/
    # The GPU machine's python3 (3.12) lacks google-re2 (the adapter parser imports it) and
    # llguidance (the engine's structured-output masks import it); their wheels travel.
    mkdir -p .gpu/whl
    .venv/bin/pip download -q google-re2 "llguidance==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llguidance"))')" \
        --no-deps -d .gpu/whl --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_31_x86_64 --only-binary=:all:
    du -sh .gpu
    ;;
tests)
    "$py" -c "import re2, llguidance" 2>/dev/null || "$py" -m pip install -q --no-deps --root-user-action=ignore .gpu/whl/*.whl
    # Only the modules with gpu tests: the others import the HTTP stack, absent there.
    "$py" -m pytest -q -m gpu -p no:cacheprovider \
        tests/lora/test_triton_kernels.py tests/engine/test_cuda.py tests/engine/test_decode_graphs.py \
        tests/engine/test_dora_cuda.py \
        2>&1 | tee "$out/gpu_tests.txt"
    ;;
bench-quick)
    "$py" -c "import re2, llguidance" 2>/dev/null || "$py" -m pip install -q --no-deps --root-user-action=ignore .gpu/whl/*.whl
    "$py" -m bench.gpu_lora --tokenizer .gpu/tokenizer --seqs 64 256 --adapters 1 8 64 \
        --new-tokens 32 --repeats 2 --peft-repeats 1 --peft-max-adapters 8 \
        --out "$out/gpu_lora_quick.json"
    ;;
bench-full)
    "$py" -m bench.gpu_lora --tokenizer .gpu/tokenizer --peft-repeats 1 \
        --out "$out/gpu_lora_full.json"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
