"""Parsing and validation of PEFT adapter directories (adapterhub_server.lora.adapter)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRAAdapter,
    TargetShape,
    adaptable_modules,
    load_adapter,
    validate_adapter_name,
)
from adapterhub_server.lora.safetensors_check import read_safetensors_header
from tests.tiny_models import ALL_PROJECTIONS, make_peft_adapter, make_tiny_llama

Q0 = "model.layers.0.self_attn.q_proj"
PREFIX = "base_model.model."


def _load_base(base_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def targets(base_dir: Path) -> dict[str, TargetShape]:
    return adaptable_modules(_load_base(base_dir))


@pytest.fixture(scope="module")
def good_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(base_dir, tmp_path_factory.mktemp("good"), seed=1)


@pytest.fixture
def adapter_copy(good_adapter: Path, tmp_path: Path) -> Path:
    """A writable copy of a valid rank-8, all-projection adapter."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def _load(path: Path, targets: dict[str, TargetShape], **kwargs: object) -> LoRAAdapter:
    kwargs.setdefault("max_rank", 64)
    return load_adapter(path, name="test", targets=targets, **kwargs)


def _rejects(path: Path, targets: dict[str, TargetShape], *fragments: str, **kwargs: object) -> str:
    with pytest.raises(AdapterValidationError) as info:
        _load(path, targets, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _edit_config(adapter: Path, **changes: object) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config.update(changes)
    (adapter / CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(adapter / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS_FILE)


def _split_file(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _write_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --- adaptable_modules ------------------------------------------------------------------------


def test_adaptable_modules_lists_every_projection(targets: dict[str, TargetShape]) -> None:
    assert len(targets) == 2 * len(ALL_PROJECTIONS)
    assert targets[Q0] == TargetShape(in_features=64, out_features=64)
    # GQA: 2 kv heads of 16 dims.
    assert targets["model.layers.1.self_attn.k_proj"] == TargetShape(64, 32)
    assert targets["model.layers.1.mlp.down_proj"] == TargetShape(128, 64)
    assert "lm_head" not in targets


# --- equivalence with PEFT --------------------------------------------------------------------

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "alpha": 12},
    "rank_pattern": {"rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2}},
    "alpha_pattern": {"alpha_pattern": {"v_proj": 32, "layers.0.mlp.up_proj": 3.5}},
    # PEFT takes the first matching key, not the longest: every q_proj gets 4, not 2.
    "pattern_order": {"rank_pattern": {"q_proj": 4, "self_attn.q_proj": 2}},
    # Keys are regexes matched against the end of the module path, at a "." boundary.
    # "proj" matches nothing: "q_proj" does not end in ".proj". No plain substring matching.
    "pattern_regex": {
        "rank_pattern": {
            r"layers\.1\.self_attn\.(k|v)_proj": 2,
            "proj": 5,
            r"mlp\.(up|gate)_proj": 3,
        }
    },
    "rslora_patterns": {
        "use_rslora": True,
        "rank_pattern": {"gate_proj": 6},
        "alpha_pattern": {"o_proj": 5},
    },
    "subset": {"target_modules": ("q_proj", "v_proj"), "r": 4},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_peft_delta_weights(
    variant: str, base_dir: Path, targets: dict[str, TargetShape], tmp_path: Path
) -> None:
    from peft import PeftModel

    adapter_dir = make_peft_adapter(base_dir, tmp_path / "adapter", seed=3, **VARIANTS[variant])
    adapter = _load(adapter_dir, targets)

    peft_model = PeftModel.from_pretrained(_load_base(base_dir), adapter_dir)
    inner = peft_model.base_model.model
    peft_modules = {
        name
        for name, m in inner.named_modules()
        if hasattr(m, "get_delta_weight") and name in targets
    }
    assert set(adapter.modules) == peft_modules
    for name, lora in adapter.modules.items():
        peft_layer = inner.get_submodule(name)
        assert lora.a.dtype == lora.b.dtype == torch.float32
        assert lora.a.is_contiguous() and lora.b.is_contiguous()
        assert lora.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12), name
        expected = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(lora.scale * lora.b @ lora.a, expected, rtol=1e-5, atol=1e-6)
    assert adapter.rank == max(m.rank for m in adapter.modules.values())
    assert adapter.num_bytes == sum(m.a.nbytes + m.b.nbytes for m in adapter.modules.values())


def test_pattern_order_changed_by_peft_save(
    base_dir: Path, targets: dict[str, TargetShape], tmp_path: Path
) -> None:
    """PEFT writes adapter_config.json with sort_keys=True, reordering rank_pattern.

    At creation "q_proj" came first and matched layer-0 q_proj (rank 4); in the saved file
    "layers.0.self_attn.q_proj" sorts first and resolves to 2. PEFT itself then fails to load
    its own adapter; the server refuses it with a message naming the key.
    """
    from peft import PeftModel

    adapter_dir = make_peft_adapter(
        base_dir,
        tmp_path / "adapter",
        seed=3,
        rank_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 2},
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(_load_base(base_dir), adapter_dir)
    _rejects(
        adapter_dir, targets, f"{Q0}' has rank 4", "rank_pattern['layers.0.self_attn.q_proj'] = 2"
    )


def test_loaded_fields(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    adapter = _load(adapter_copy, targets)
    assert adapter.name == "test"
    assert adapter.source == str(adapter_copy)
    assert adapter.config["r"] == 8 and adapter.rank == 8
    assert list(adapter.modules) == list(targets)  # base-model order
    q = adapter.modules[Q0]
    assert q.a.shape == (8, 64) and q.b.shape == (64, 8) and q.scale == 2.0


def test_accepts_adapter_name_segment(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    reference = _load(adapter_copy, targets)

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    _edit_tensors(adapter_copy, rename)
    adapter = _load(adapter_copy, targets)
    for name, lora in adapter.modules.items():
        torch.testing.assert_close(lora.a, reference.modules[name].a, rtol=0, atol=0)
        torch.testing.assert_close(lora.b, reference.modules[name].b, rtol=0, atol=0)


def test_bf16_and_f64_tensors_become_float32(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    def cast(tensors: dict[str, torch.Tensor]) -> None:
        for i, key in enumerate(sorted(tensors)):
            tensors[key] = tensors[key].to(torch.bfloat16 if i % 2 else torch.float64)

    _edit_tensors(adapter_copy, cast)
    adapter = _load(adapter_copy, targets)
    assert all(m.a.dtype == m.b.dtype == torch.float32 for m in adapter.modules.values())


def test_auto_map_imports_nothing(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    marker = adapter_copy / "imported.txt"
    (adapter_copy / "evil_adapter_code.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(adapter_copy, auto_map={"AutoModel": "evil_adapter_code.EvilModel"})
    adapter = _load(adapter_copy, targets)
    assert adapter.config["auto_map"] == {"AutoModel": "evil_adapter_code.EvilModel"}
    assert not marker.exists()
    assert "evil_adapter_code" not in sys.modules


def test_base_model_mismatch_is_ignored(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    _edit_config(adapter_copy, base_model_name_or_path="someone/other-model")
    assert _load(adapter_copy, targets).config["base_model_name_or_path"] == "someone/other-model"


def test_rejects_pathological_pattern(
    adapter_copy: Path, targets: dict[str, TargetShape], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Catastrophic backtracking on every module path: must be cut off, not hang the loader.
    monkeypatch.setattr("adapterhub_server.lora.adapter._PATTERN_BUDGET_S", 0.2)
    _edit_config(adapter_copy, rank_pattern={r"(.|.)*\d": 8})
    _rejects(adapter_copy, targets, "took too long", "rank_pattern/alpha_pattern")


# --- directory and config ---------------------------------------------------------------------


def test_rejects_pickle_only_dir(
    adapter_copy: Path, targets: dict[str, TargetShape], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    (adapter_copy / WEIGHTS_FILE).unlink()
    (adapter_copy / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _rejects(
        adapter_copy,
        targets,
        "adapter_model.bin",
        "pickle-based weights are not accepted",
        "safetensors",
    )


@pytest.mark.parametrize("filename", ["weights.pt", "model.pth", "state.pkl"])
def test_rejects_other_pickle_suffixes(
    adapter_copy: Path, targets: dict[str, TargetShape], filename: str
) -> None:
    (adapter_copy / WEIGHTS_FILE).unlink()
    (adapter_copy / filename).write_bytes(b"\x80\x04")
    _rejects(adapter_copy, targets, filename, "pickle-based weights are not accepted")


def test_rejects_missing_files(
    adapter_copy: Path, targets: dict[str, TargetShape], tmp_path: Path
) -> None:
    (adapter_copy / CONFIG_FILE).unlink()
    _rejects(adapter_copy, targets, "missing adapter_config.json")
    (adapter_copy / WEIGHTS_FILE).unlink()
    _rejects(adapter_copy, targets, f"missing {WEIGHTS_FILE}")
    _rejects(tmp_path / "nope", targets, "is not a directory")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"use_dora": True}, ["DoRA", "use_dora"]),
        ({"bias": "all"}, ['bias is "all"', '"none"']),
        ({"bias": "lora_only"}, ['bias is "lora_only"']),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save is not supported", "lm_head"]),
        ({"layers_to_transform": [0]}, ["layers_to_transform is not supported"]),
        ({"layers_pattern": "layers"}, ["layers_pattern is not supported"]),
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
        ({"target_parameters": ["mlp.experts.down_proj"]}, ["target_parameters is not supported"]),
        ({"lora_bias": True}, ["lora_bias"]),
        ({"alora_invocation_tokens": [1, 2]}, ["Activated LoRA"]),
        ({"peft_type": "IA3"}, ['peft_type is "IA3"']),
        ({"r": 0}, ["r must be a positive integer"]),
        ({"r": 8.5}, ["r must be a positive integer"]),
        ({"lora_alpha": -1}, ["lora_alpha must be a positive finite number"]),
        ({"lora_alpha": "16"}, ["lora_alpha must be a positive finite number"]),
        ({"lora_alpha": math.inf}, ["lora_alpha must be a positive finite number"]),
        ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj'] must be a positive integer"]),
        ({"alpha_pattern": {"(unclosed": 4}}, ["'(unclosed' is not a valid regular expression"]),
        ({"rank_pattern": ["q_proj"]}, ["rank_pattern must be an object"]),
    ],
)
def test_rejects_config(
    adapter_copy: Path, targets: dict[str, TargetShape], changes: dict, fragments: list[str]
) -> None:
    _edit_config(adapter_copy, **changes)
    _rejects(adapter_copy, targets, CONFIG_FILE, *fragments)


@pytest.mark.parametrize(
    ("content", "fragment"), [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")]
)
def test_rejects_malformed_config(
    adapter_copy: Path, targets: dict[str, TargetShape], content: str, fragment: str
) -> None:
    (adapter_copy / CONFIG_FILE).write_text(content)
    _rejects(adapter_copy, targets, CONFIG_FILE, fragment)


def test_rejects_config_rank_disagreeing_with_tensors(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    _edit_config(adapter_copy, rank_pattern={"v_proj": 4})
    _rejects(adapter_copy, targets, "v_proj' has rank 8", "rank_pattern['v_proj'] = 4")
    _edit_config(adapter_copy, rank_pattern={}, r=16)
    _rejects(adapter_copy, targets, "has rank 8", "gives r = 16")


# --- raw safetensors checks -------------------------------------------------------------------


def test_rejects_truncated_file(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    weights = adapter_copy / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) - 100])
    _rejects(adapter_copy, targets, WEIGHTS_FILE, "outside the data area", "truncated")
    weights.write_bytes(blob[:200])  # cut inside the header
    _rejects(adapter_copy, targets, WEIGHTS_FILE, "needs", "truncated")
    weights.write_bytes(blob[:5])
    _rejects(adapter_copy, targets, "too short")


def test_rejects_header_length_beyond_file(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    weights = adapter_copy / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    _rejects(adapter_copy, targets, f"header length {len(blob)}", f"only {len(blob)}")
    weights.write_bytes(struct.pack("<Q", 2**63) + blob[8:])
    _rejects(adapter_copy, targets, "exceeds the 100000000-byte limit")


def test_rejects_file_over_size_limit(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    _rejects(adapter_copy, targets, "over the server's limit of 1000 bytes", max_file_bytes=1000)


def test_rejects_header_not_json(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    weights = adapter_copy / WEIGHTS_FILE
    _, data = _split_file(weights)
    raw = b"[not json"
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _rejects(adapter_copy, targets, "header is not valid UTF-8 JSON")
    _write_file(weights, [1, 2], data)  # type: ignore[arg-type]
    _rejects(adapter_copy, targets, "header must be a JSON object")


def _lie(adapter: Path, edit: Callable[[dict], None]) -> None:
    weights = adapter / WEIGHTS_FILE
    header, data = _split_file(weights)
    edit(header)
    _write_file(weights, header, data)


A0 = PREFIX + Q0 + ".lora_A.weight"
K0_A = PREFIX + "model.layers.0.self_attn.k_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda h: h[A0].update(dtype="F16"), ["dtype F16", "needs 1024 bytes", "lying header"]),
        (lambda h: h[A0].update(shape=[8, 32]), ["shape [8, 32] needs 1024 bytes"]),
        (lambda h: h[A0].update(shape=[8, -64]), ["shape must be a list of non-negative integers"]),
        (lambda h: h[A0].update(shape="8x64"), ["shape must be a list"]),
        (
            lambda h: h[A0].update(
                data_offsets=[h[A0]["data_offsets"][0], h[A0]["data_offsets"][1] + 4]
            ),
            ["span 2052 bytes"],
        ),
        (lambda h: h[A0].update(data_offsets=[0, 10**12]), ["outside the data area"]),
        (lambda h: h[A0].update(data_offsets=[-4, 2044]), ["outside the data area"]),
        (
            lambda h: h[A0].update(data_offsets=["0", 2048]),
            ["data_offsets must be [begin, end] integers"],
        ),
        (lambda h: h[A0].update(data_offsets=h[K0_A]["data_offsets"]), ["overlaps"]),
        (lambda h: h[A0].pop("dtype"), ["header entry lacks dtype"]),
        (lambda h: h.update({"__metadata__": {"format": 1}}), ["__metadata__"]),
    ],
)
def test_rejects_lying_header(
    adapter_copy: Path,
    targets: dict[str, TargetShape],
    edit: Callable[[dict], None],
    fragments: list[str],
) -> None:
    _lie(adapter_copy, edit)
    _rejects(adapter_copy, targets, WEIGHTS_FILE, *fragments)


def test_rejects_gaps_and_trailing_bytes(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    weights = adapter_copy / WEIGHTS_FILE
    header, data = _split_file(weights)
    _write_file(weights, header, data + b"\0" * 16)
    _rejects(adapter_copy, targets, "trailing data")
    header.pop(A0)  # its bytes stay in the data area but belong to no tensor
    _write_file(weights, header, data)
    _rejects(adapter_copy, targets, "belong to no tensor")


def test_header_check_accepts_peft_file(good_adapter: Path) -> None:
    entries = read_safetensors_header(good_adapter / WEIGHTS_FILE, max_file_bytes=2**30)
    assert entries[A0].dtype == "F32" and entries[A0].shape == (8, 64)


# --- tensor contents --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"), [(math.nan, "1 NaN, 0 Inf"), (math.inf, "0 NaN, 1 Inf")]
)
def test_rejects_non_finite(
    adapter_copy: Path, targets: dict[str, TargetShape], value: float, fragment: str
) -> None:
    key = PREFIX + "model.layers.1.mlp.up_proj.lora_B.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][3, 2] = value

    _edit_tensors(adapter_copy, poison)
    _rejects(adapter_copy, targets, key, "non-finite", fragment)


def test_rejects_f64_overflowing_float32(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    def blow_up(tensors: dict[str, torch.Tensor]) -> None:
        tensors[A0] = tensors[A0].double()
        tensors[A0][0, 0] = 1e300

    _edit_tensors(adapter_copy, blow_up)
    _rejects(adapter_copy, targets, A0, "1 Inf")


def test_rejects_integer_dtype(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        tensors[A0] = tensors[A0].to(torch.int32)

    _edit_tensors(adapter_copy, to_int)
    _rejects(adapter_copy, targets, A0, "dtype 'I32'", "float dtype")


def test_rejects_rank_over_limit(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    _rejects(adapter_copy, targets, "rank 8", "--max-lora-rank=4", max_rank=4)


def test_rejects_unknown_module(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    def move(tensors: dict[str, torch.Tensor]) -> None:
        for kind in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}model.layers.99.self_attn.q_proj.{kind}.weight"] = tensors.pop(
                f"{PREFIX}{Q0}.{kind}.weight"
            )

    _edit_tensors(adapter_copy, move)
    _rejects(
        adapter_copy,
        targets,
        "model.layers.99.self_attn.q_proj",
        "no such module",
        Q0,
        "14 in total",
    )


def test_rejects_unadaptable_module(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    def add_lm_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}lm_head.lora_A.weight"] = torch.zeros(8, 64)
        tensors[f"{PREFIX}lm_head.lora_B.weight"] = torch.zeros(320, 8)

    _edit_tensors(adapter_copy, add_lm_head)
    _rejects(adapter_copy, targets, "'lm_head'", "inside decoder layers can be adapted")


def test_rejects_other_base_shapes(
    base_dir: Path, targets: dict[str, TargetShape], tmp_path: Path
) -> None:
    other_base = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    adapter_dir = make_peft_adapter(other_base, tmp_path / "adapter", seed=2)
    _rejects(adapter_dir, targets, "shape [8, 32]", "expected [r, 64]", "in_features is 64")


def test_rejects_wrong_out_features(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    key = PREFIX + Q0 + ".lora_B.weight"

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key][:32].clone()

    _edit_tensors(adapter_copy, shrink)
    _rejects(adapter_copy, targets, key, "expected [64, r]", "out_features is 64")


def test_rejects_inconsistent_rank(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    key = PREFIX + Q0 + ".lora_B.weight"

    def cut_rank(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key][:, :4].clone()

    _edit_tensors(adapter_copy, cut_rank)
    _rejects(adapter_copy, targets, key, "expected [64, 8]", "has rank 8")


def test_rejects_a_without_b(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    _edit_tensors(adapter_copy, lambda t: t.pop(PREFIX + Q0 + ".lora_B.weight"))
    _rejects(adapter_copy, targets, Q0, "has lora_A", "but no lora_B")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (PREFIX + "model.embed_tokens.lora_embedding_A", "embedding"),
        (PREFIX + Q0 + ".lora_magnitude_vector", "DoRA"),
        (PREFIX + Q0 + ".lora_B.bias", "lora_bias"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.<module path>"),
        (PREFIX + Q0 + ".base_layer.weight", "only lora_A.weight / lora_B.weight"),
    ],
)
def test_rejects_unexpected_tensor(
    adapter_copy: Path, targets: dict[str, TargetShape], key: str, fragment: str
) -> None:
    _edit_tensors(adapter_copy, lambda t: t.update({key: torch.zeros(4, 8)}))
    _rejects(adapter_copy, targets, "unexpected tensor", key, fragment)


def test_rejects_mixed_adapter_segments(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    def rename_one(tensors: dict[str, torch.Tensor]) -> None:
        for kind in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{Q0}.{kind}.other.weight"] = tensors.pop(
                f"{PREFIX}{Q0}.{kind}.weight"
            )

    _edit_tensors(adapter_copy, rename_one)
    _rejects(adapter_copy, targets, "mix adapter-name segments")


def test_rejects_empty_weights(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    save_file({}, adapter_copy / WEIGHTS_FILE)
    _rejects(adapter_copy, targets, "holds no tensors")


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "my-adapter.v2_1", "x" * 64, "a.b"])
def test_valid_names(name: str) -> None:
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "..",
        "a..b",
        "../etc",
        "%2e%2e",
        "a%2fb",
        "Upper",
        "x" * 65,
        "-a",
        ".hidden",
        "_a",
        "a\n",
        "a b",
        "a\\b",
        "é",
        None,
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_name(name)
    assert info.value.param == "name"
    assert "invalid adapter name" in info.value.message


@pytest.mark.parametrize(
    ("target_modules", "exclude_modules", "accepted"),
    [
        (list(ALL_PROJECTIONS), None, True),
        (r".*\.(q|k|v|o|gate|up|down)_proj", None, True),
        ("all-linear", None, True),
        (["q_proj", "v_proj"], None, False),  # weights for 5 modules PEFT would not build
        (r"model\.layers\.0\..*", None, False),  # a regex must match the whole path
        (list(ALL_PROJECTIONS), ["down_proj"], False),
        (list(ALL_PROJECTIONS), r".*\.layers\.1\..*", False),
        (["lm_head"], None, False),
    ],
)
def test_weights_must_be_for_modules_target_modules_selects(
    adapter_copy: Path,
    targets: dict[str, TargetShape],
    target_modules: object,
    exclude_modules: object,
    accepted: bool,
) -> None:
    _edit_config(adapter_copy, target_modules=target_modules, exclude_modules=exclude_modules)
    if accepted:
        assert len(_load(adapter_copy, targets).modules) == len(targets)
    else:
        _rejects(adapter_copy, targets, "target_modules", "PEFT would ignore these weights")


def test_malformed_target_modules(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    _edit_config(adapter_copy, target_modules="(unclosed")
    _rejects(adapter_copy, targets, "regex")
    _edit_config(adapter_copy, target_modules=[1, 2])
    _rejects(adapter_copy, targets, "a string or a list of strings")
