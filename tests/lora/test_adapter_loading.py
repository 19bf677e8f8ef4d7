"""Parsing and validation of PEFT adapter directories (adapterhub_server.lora.adapter)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import time
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
    magnitude_limit,
    validate_adapter_name,
)
from adapterhub_server.lora.patterns import (
    MAX_PATTERN_KEYS,
    ModuleSelector,
    PatternError,
    first_matches,
    full_pattern,
    pattern_key,
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


# Patterns that make Python's backtracking `re` take time exponential in the module path
# (2**25 steps and more on these paths: minutes). RE2 answers in microseconds.
BACKTRACKING = "model(.|.)*Z"


@pytest.mark.parametrize(
    "changes",
    [
        {"exclude_modules": BACKTRACKING},  # matches nothing: PEFT would accept the adapter
        {"rank_pattern": {"(.|.)*Z": 4}, "alpha_pattern": {"(.|.)*Z": 2}},
        {"target_modules": r"(model(.|.)*)?(q|k|v|o|gate|up|down)_proj"},
    ],
)
def test_backtracking_patterns_load_in_linear_time(
    adapter_copy: Path, targets: dict[str, TargetShape], changes: dict
) -> None:
    _edit_config(adapter_copy, **changes)
    start = time.monotonic()
    adapter = _load(adapter_copy, targets)
    assert time.monotonic() - start < 5  # liveness, not speed: Python's re would take minutes
    assert len(adapter.modules) == len(targets)
    assert {m.rank for m in adapter.modules.values()} == {8}


def test_backtracking_target_modules_is_refused_quickly(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    _edit_config(adapter_copy, target_modules=BACKTRACKING)
    start = time.monotonic()
    _rejects(adapter_copy, targets, "target_modules", "does not select it")
    assert time.monotonic() - start < 5


_PY311_ONLY = "linear time" if sys.version_info >= (3, 11) else "not a valid regular expression"


@pytest.mark.parametrize(
    ("field", "pattern", "fragment"),
    [
        ("target_modules", r"(q)_proj\1", "linear time"),  # backreference
        ("target_modules", r".*(?=q_proj)q_proj", "linear time"),  # lookahead
        ("exclude_modules", r".*(?<!self_attn)\.q_proj", "linear time"),  # lookbehind
        # Atomic groups and possessive quantifiers: Python >= 3.11 has them, RE2 does not.
        ("exclude_modules", r"(?>.*)q_proj", _PY311_ONLY),
        ("exclude_modules", r".*q_proj*+", _PY311_ONLY),
        ("exclude_modules", r".*q_proj{1001}", "linear time"),
        ("exclude_modules", r".*\.q_proj{,3}", "'{0,n}'"),  # Python: repeat; RE2: literal
        ("exclude_modules", r".*[[:digit:]].*", "character class"),  # RE2: class; Python: set
        ("exclude_modules", ".*\u0131", "ASCII"),  # Python folds (?i)ı to i, RE2 does not
        ("exclude_modules", "q" * 1025, "over the 1024 limit"),
        ("target_modules", "(unclosed", "not a valid regular expression"),
        ("rank_pattern", r"(?P<x>q)(?P=x)_proj", "linear time"),
        ("alpha_pattern", r"(?=q)q_proj", "linear time"),
        ("rank_pattern", "\\d" * 600, "over the 1024 limit"),
    ],
)
def test_rejects_patterns_rejected_or_read_differently_by_re2(
    adapter_copy: Path, targets: dict[str, TargetShape], field: str, pattern: str, fragment: str
) -> None:
    value = {pattern: 8} if field in ("rank_pattern", "alpha_pattern") else pattern
    _edit_config(adapter_copy, **{field: value})
    _rejects(adapter_copy, targets, CONFIG_FILE, field, fragment)


def test_rejects_too_many_pattern_keys(adapter_copy: Path, targets: dict[str, TargetShape]) -> None:
    _edit_config(adapter_copy, rank_pattern={f"x{i}": 8 for i in range(MAX_PATTERN_KEYS + 1)})
    _rejects(adapter_copy, targets, "rank_pattern has 1025 keys", "1024 limit")
    _edit_config(
        adapter_copy, rank_pattern={}, alpha_pattern={"x" * 1000 + str(i): 8 for i in range(66)}
    )
    _rejects(adapter_copy, targets, "alpha_pattern's keys hold", "65536 limit")


def test_per_module_keys_take_the_first_match() -> None:
    """EVA-style configs: one key per module. `first_matches` gives each module the first
    key (in order) that selects it, as PEFT's get_pattern_key does."""
    from peft.utils.other import get_pattern_key

    keys = [*(p for p in _PATHS[:10]), r"layers\.1\..*", "q_proj", ".*"]
    found = first_matches([pattern_key(k) for k in keys], _PATHS)
    for path in _PATHS:
        expected = get_pattern_key(keys, path)
        assert keys[found[path]] == expected, path


# Module paths of every kind (and of none the base model has), matched by PEFT's own rules:
# the RE2 matcher must agree with Python's re on each.
_PATHS = [
    f"model.layers.{i}.{sub}.{p}"
    for i in (0, 1, 11)
    for sub, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
    for p in (f"{n}_proj" for n in names)
] + ["model.embed_tokens", "lm_head", "q_proj", "model.layers.1"]
_REGEXES = [
    r".*\.(q|k|v|o|gate|up|down)_proj",
    r"model\.layers\.1\..*",
    r"model\.layers\.\d+\.mlp\.(up|down)_proj",
    "q_proj|v_proj",
    r".*q_proj$",
    r".*q_proj\Z",
    r"^model\.layers\.0\..*",
    r"(?i).*\.Q_PROJ",
    r"(?i:MODEL)\.layers\.[0-9]\.self_attn\.[^.]_proj",
    r".*\b(up|gate)_proj",
    r"\w+\.\w+\.1\w?\.\S+",
    r".*layers\.1{2}\..*",
    r".*layers\.1{1,}\..*",
    "[]a-z._0-9]+",
    "[^]A-Z]+_proj",
    r"\A.*\.o_proj",
    ".*proj",
    "proj",
    "",
    r"lm_head|model\.embed_tokens",
]
_KEYS = [*_REGEXES, "q_proj)|(v_proj", "layers.1.mlp.up_proj", r"self_attn\.(k|v)_proj"]


@pytest.mark.parametrize("pattern", _REGEXES)
def test_target_modules_regex_matches_like_peft(pattern: str) -> None:
    import re

    from peft.utils.other import match_target_against_key

    selects = full_pattern(pattern).matcher()
    for path in _PATHS:
        expected = match_target_against_key(pattern, path) is not None
        assert expected == (re.fullmatch(pattern, path) is not None)
        assert selects(path) == expected, (pattern, path)


@pytest.mark.parametrize("key", _KEYS)
def test_rank_pattern_key_matches_like_peft(key: str) -> None:
    import re

    from peft.utils.other import get_pattern_key

    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        # Global flags inside PEFT's wrapper, e.g. "(?i)...": PEFT itself would fail.
        with pytest.raises(PatternError, match="not a valid regular expression"):
            pattern_key(key)
        return
    selects = pattern_key(key).matcher()
    for path in _PATHS:
        # get_pattern_key returns the key when it matches, else the module path itself.
        expected = get_pattern_key([key], path) == key and (key != path)
        if key == path:
            continue  # the fallback lookup by name, not a regex match
        assert selects(path) == expected, (key, path)


@pytest.mark.parametrize(
    "entries",
    [
        ["q_proj", "v_proj"],
        ["self_attn.q_proj", "mlp.up_proj"],
        ["1.mlp.down_proj"],
        ["proj"],
        [""],
        [".q_proj"],
        ["lm_head", "model.layers.1"],
    ],
)
def test_target_modules_list_matches_like_peft(entries: list[str]) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=entries)
    selector = ModuleSelector.parse(entries)
    for path in _PATHS:
        assert selector.selects(path) == bool(check_target_module_exists(config, path)), path


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
    message = _rejects(tmp_path / "nope", targets, "'nope' does not exist")
    assert str(tmp_path) not in message  # messages reach clients: no server paths


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"use_dora": True}, ["DoRA", "use_dora"]),
        ({"bias": "all"}, ['bias is "all"', '"none"']),
        ({"bias": "lora_only"}, ['bias is "lora_only"']),
        # Served (tests/lora/test_full_modules.py), given the base's embedding shapes.
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save cannot be validated here"]),
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
        # Infinity is not JSON: refused by the parser (json_limits) before any field is read.
        ({"lora_alpha": math.inf}, ["not valid JSON", "Infinity"]),
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


# --- magnitudes the serving dtype cannot hold -------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DOWN1 = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accepts_realistic_magnitudes(
    good_adapter: Path, targets: dict[str, TargetShape], dtype: torch.dtype
) -> None:
    # Random A and B (std 0.3, rank 8, scale 2): larger than trained adapters' B, which
    # starts at zero.
    assert len(_load(good_adapter, targets, serving_dtype=dtype).modules) == len(targets)


@pytest.mark.parametrize(
    ("in_features", "out_features", "r"),
    [(576, 1536, 16), (1536, 576, 64), (4096, 4096, 16), (11008, 4096, 64)],
)
def test_accepts_peft_initialised_weights_at_real_sizes(
    tmp_path: Path, in_features: int, out_features: int, r: int
) -> None:
    """PEFT's initialisation of A (kaiming_uniform_ with a=sqrt(5), as nn.Linear), and the
    same for B (init_lora_weights=False; True sets B = 0), at the sizes of SmolLM2 and of 7B
    models."""
    from peft import LoraConfig

    a, b = torch.empty(r, in_features), torch.empty(out_features, r)
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    module = "model.layers.0.mlp.down_proj"
    tensors = {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["down_proj"]).to_dict()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config, default=list))
    shapes = {module: TargetShape(in_features=in_features, out_features=out_features)}
    for dtype in (torch.float32, torch.bfloat16):
        assert module in _load(tmp_path, shapes, serving_dtype=dtype).modules


@pytest.mark.parametrize(
    ("a_value", "b_value"), [(1e15, 1e15), (None, 1e15), (1e15, None), (None, 1e7)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rejects_weights_that_overflow_the_serving_dtype(
    adapter_copy: Path,
    targets: dict[str, TargetShape],
    a_value: float | None,
    b_value: float | None,
    dtype: torch.dtype,
) -> None:
    """Finite but absurd weights: one module's factors filled with huge values."""

    def inflate(tensors: dict[str, torch.Tensor]) -> None:
        for kind, value in (("lora_A", a_value), ("lora_B", b_value)):
            if value is not None:
                tensors[f"{PREFIX}{DOWN1}.{kind}.weight"].fill_(value)

    _edit_tensors(adapter_copy, inflate)
    _rejects(
        adapter_copy,
        targets,
        f"module '{DOWN1}'",
        "too large to serve in " + str(dtype).removeprefix("torch."),
        serving_dtype=dtype,
    )


def test_magnitude_bound_depends_on_the_dtype(
    adapter_copy: Path, targets: dict[str, TargetShape]
) -> None:
    """B = 100 everywhere: a gain of ~3e4 per unit input, fine in float32 and bfloat16
    (bound 2**20), not in float16 (bound sqrt(65504) = 256)."""
    assert magnitude_limit(torch.float16) == pytest.approx(256, rel=1e-3)
    assert magnitude_limit(torch.float32) == magnitude_limit(torch.bfloat16) == 2.0**20

    def inflate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}{DOWN1}.lora_B.weight"].fill_(100.0)

    _edit_tensors(adapter_copy, inflate)
    _load(adapter_copy, targets, serving_dtype=torch.float32)
    _load(adapter_copy, targets, serving_dtype=torch.bfloat16)
    _rejects(adapter_copy, targets, DOWN1, "float16", serving_dtype=torch.float16)


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
    _rejects(adapter_copy, targets, "target_modules", "not a valid regular expression")
    _edit_config(adapter_copy, target_modules=[1, 2])
    _rejects(adapter_copy, targets, "a string or a list of strings")
