"""Parse and validate a PEFT LoRA adapter directory against the base model it will serve on.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
HF PEFT writes them. Everything the engine cannot serve is refused here, at load/upload time,
with a message that names the file, key or module and what was expected; nothing is ever
unpickled and no code named by the config (`auto_map`) is ever imported.

The result is a `LoRAAdapter`: per base module, float32 A `[r, in_features]`, B
`[out_features, r]` and the scale PEFT would use, so that for every module

    delta_W = scale * B @ A      # [out_features, in_features]

equals PEFT's own `get_delta_weight`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.json_limits import JsonLimitError, parse_json
from adapterhub_server.lora.full_modules import EmbeddingTargets, FullModules, parse_full_modules
from adapterhub_server.lora.patterns import (
    MAX_PATTERN_KEY_CHARS,
    MAX_PATTERN_KEYS,
    ModulePattern,
    ModuleSelector,
    PatternError,
    first_matches,
    pattern_key,
)
from adapterhub_server.lora.safetensors_check import load_checked_safetensors
from adapterhub_server.weight_files import is_pickle_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

ADAPTER_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)

# A PEFT config is a few KB; the cap only stops a hostile upload from exhausting memory.
_MAX_CONFIG_BYTES = 4 * 1024 * 1024

# `base_model.model.<module>.lora_A.weight`, or with the adapter-name segment PEFT uses inside
# a live model's state dict (`...lora_A.<adapter>.weight`), which some tools save verbatim.
_KEY_RE = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight"
)

# DoRA's magnitude: PEFT saves `<module>.lora_magnitude_vector` (no `.weight`); a live model's
# state dict has `.lora_magnitude_vector.<adapter>.weight`, and PEFT also loads `.weight` alone.
_MAGNITUDE_RE = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+)\.weight|\.weight)?"
)

# Config options that change what the adapter computes at inference time (or the model it
# applies to) in ways the batched A/B kernels do not implement. Value: why it is refused.
_UNSUPPORTED_WHEN_SET: dict[str, str] = {
    "layers_to_transform": "layers_to_transform is not supported; save the adapter with explicit module names",
    "layers_pattern": "layers_pattern is not supported; save the adapter with explicit module names",
    "fan_in_fan_out": "fan_in_fan_out: true is not supported (Conv1D-style weights); only nn.Linear bases are served",
    "target_parameters": "target_parameters is not supported: only nn.Linear modules can be adapted",
    "lora_bias": "lora_bias: true is not supported: the adapter's lora_B would carry a bias",
    "use_qalora": "QALoRA (use_qalora: true) is not supported",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication is not supported: it changes the base model's layer stack",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}


MAX_MODULE_GAIN = 2.0**20
"""Cap on any module's gain whatever the dtype (see `magnitude_limit`)."""


def magnitude_limit(dtype: torch.dtype) -> float:
    """Largest gain an adapter module may have when served in `dtype`.

    The gain bounds |delta y_i| / max_j |x_j| (see `_check_magnitude`). The limit is
    min(sqrt(finfo(dtype).max), 2**20), a safety margin below the dtype's range for two
    reasons:

    * the delta is multiplied by another value of its size downstream (RMSNorm squares the
      residual stream, attention multiplies q by k, the MLP gate by up), so a value above the
      square root of the range can overflow there even where the LoRA product does not:
      256 for float16;
    * adapted projections compound within one decoder layer (v then o; gate times up, then
      down), so a gain g can grow activations by about g**3 before the next norm squares
      them: g**6 must stay within float32's range (the norm computes in float32), which
      holds up to g of about 2.9e6, so 2**20 for float32 and bfloat16.

    Trained adapters have gains of 1 to 1e3 by this measure; PEFT's initialisation has 0.
    """
    return min(math.sqrt(torch.finfo(dtype).max), MAX_MODULE_GAIN)


@dataclass(frozen=True)
class TargetShape:
    """Shape of one adaptable base linear: weight is `[out_features, in_features]`."""

    in_features: int
    out_features: int


@dataclass(frozen=True, eq=False)
class ModuleLoRA:
    """One module's LoRA factors; delta_W = scale * b @ a, `[out_features, in_features]`."""

    a: torch.Tensor
    """`[r, in_features]`, float32, contiguous, finite."""
    b: torch.Tensor
    """`[out_features, r]`, float32, contiguous, finite."""
    scale: float
    """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module patterns applied)."""
    magnitude: torch.Tensor | None = None
    """DoRA only (use_dora): `[out_features]` float32, finite; the output is then
    `m / ||W + scale * b @ a||_row * (W x + scale * b @ a @ x) + bias` (see `lora.dora`)."""

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"inconsistent LoRA factors: a {tuple(self.a.shape)}, b {tuple(self.b.shape)}"
            )
        if self.magnitude is not None and tuple(self.magnitude.shape) != (self.b.shape[0],):
            raise ValueError(
                f"DoRA magnitude {tuple(self.magnitude.shape)} does not match b {tuple(self.b.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A validated adapter, ready to be copied into engine slots."""

    name: str
    modules: dict[str, ModuleLoRA]
    """Key: base module path relative to the CausalLM, e.g. "model.layers.0.self_attn.q_proj"."""
    rank: int
    """Largest rank over all modules."""
    config: dict[str, Any] = field(repr=False)
    """The adapter_config.json contents, as read."""
    source: str
    """Directory it was loaded from."""
    full_modules: FullModules | None = None
    """Full copies of the embedding / output head (modules_to_save) and trainable token
    rows (trainable_token_indices), or None for a LoRA-only adapter."""

    @property
    def num_bytes(self) -> int:
        """Bytes held by the A and B tensors (and DoRA magnitudes)."""
        return sum(
            m.a.nbytes + m.b.nbytes + (m.magnitude.nbytes if m.magnitude is not None else 0)
            for m in self.modules.values()
        )

    @property
    def use_dora(self) -> bool:
        """True for a DoRA adapter (every module then has a magnitude)."""
        return any(m.magnitude is not None for m in self.modules.values())


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise AdapterValidationError(param="name").

    Names match ^[a-z0-9][a-z0-9._-]{0,63}$ and never contain "..": they become directory
    names in the registry, so anything that could traverse paths ("/", "..", "%2e%2e", "\\")
    or differ only by case is refused.
    """
    shown = repr(name)[:80]
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if not isinstance(name, str) or _ADAPTER_NAME_RE.fullmatch(name) is None:
        raise AdapterValidationError(
            f"invalid adapter name {shown}: names must match ^{ADAPTER_NAME_PATTERN}$ "
            "(1-64 characters: lowercase letters, digits, '.', '_', '-'; starting with a letter or digit)",
            param="name",
        )
    if ".." in name:
        raise AdapterValidationError(
            f"invalid adapter name {shown}: '..' is not allowed", param="name"
        )
    return name


def adaptable_modules(model: nn.Module) -> dict[str, TargetShape]:
    """Every adaptable nn.Linear of a CausalLM, keyed by module path relative to `model`.

    Adaptable: any nn.Linear inside an indexed element of an nn.ModuleList (the decoder
    layer stack), e.g. "model.layers.3.mlp.down_proj" or Phi-3's fused
    "model.layers.0.self_attn.qkv_proj": PEFT's `all-linear` within the decoder layers
    (the output head and embeddings are outside them). The paths are the ones PEFT uses
    after its "base_model.model." prefix.
    """
    module_lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    out: dict[str, TargetShape] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        in_layer_stack = any(
            ".".join(parts[:i]) in module_lists and parts[i].isdigit()
            for i in range(len(parts) - 1)
        )
        if in_layer_stack:
            out[name] = TargetShape(
                in_features=module.in_features, out_features=module.out_features
            )
    return out


@dataclass(frozen=True)
class _Pattern:
    compiled: ModulePattern
    value: float

    @property
    def key(self) -> str:
        return self.compiled.pattern


@dataclass(frozen=True)
class _LoraSettings:
    """The parts of adapter_config.json that decide which modules are adapted, with which
    ranks and scales."""

    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: tuple[_Pattern, ...]
    alpha_pattern: tuple[_Pattern, ...]
    target_modules: ModuleSelector | None
    """None: every projection (the field absent, as in old PEFT configs, or "all-linear")."""
    exclude_modules: ModuleSelector | None
    use_dora: bool = False
    """DoRA: every adapted module must carry a `lora_magnitude_vector` (see `lora.dora`)."""


def _short(value: object) -> str:
    # Config values come from uploads; keep error messages bounded.
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _shown_key(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 200 else text[:200] + "..."


def _config_error(detail: str) -> AdapterValidationError:
    return AdapterValidationError(f"{CONFIG_FILE}: {detail}", param="file")


def _is_set(value: object) -> bool:
    # PEFT writes null / false / [] / {} for options that are off.
    return value is not None and value is not False and value != [] and value != {} and value != ""


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_config(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _config_error(f"cannot be read ({exc.strerror})") from exc
    if size > _MAX_CONFIG_BYTES:
        raise _config_error(f"file is {size} bytes, over the {_MAX_CONFIG_BYTES}-byte limit")
    try:
        # Within json_limits' bounds: the config's strings end up in the index and in
        # responses, where a lone surrogate could not be encoded.
        config = parse_json(path.read_bytes())
    except OSError as exc:
        raise _config_error(f"cannot be read ({exc.strerror})") from exc
    except JsonLimitError as exc:
        raise _config_error(f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _config_error(f"must be a JSON object, got {type(config).__name__}")
    return config


def _compile_patterns(config: dict[str, Any], key: str, *, integer: bool) -> tuple[_Pattern, ...]:
    patterns = config.get(key)
    if patterns is None:
        return ()
    if not isinstance(patterns, dict):
        raise _config_error(
            f"{key} must be an object mapping module patterns to values, got {_short(patterns)}"
        )
    if len(patterns) > MAX_PATTERN_KEYS:
        raise _config_error(f"{key} has {len(patterns)} keys, over the {MAX_PATTERN_KEYS} limit")
    key_chars = sum(len(k) for k in patterns)
    if key_chars > MAX_PATTERN_KEY_CHARS:
        raise _config_error(
            f"{key}'s keys hold {key_chars} characters, over the {MAX_PATTERN_KEY_CHARS} limit"
        )
    out = []
    for module_key, value in patterns.items():
        if not (_positive_int(value) if integer else _positive_number(value)):
            kind = "positive integer" if integer else "positive number"
            raise _config_error(
                f"{key}[{_shown_key(module_key)}] must be a {kind}, got {_short(value)}"
            )
        # PEFT's peft.utils.other.get_pattern_key matches re.match(rf"(.*\.)?({key})$", module):
        # the key is a regex anchored at the end and starting at a "." boundary (or the start).
        try:
            compiled = pattern_key(module_key)
        except PatternError as exc:
            raise _config_error(f"{key} key {_shown_key(module_key)} {exc}") from None
        out.append(_Pattern(compiled=compiled, value=value))
    return tuple(out)


def _selector(config: dict[str, Any], key: str) -> ModuleSelector | None:
    value = config.get(key)
    if key == "target_modules":
        # Absent in old PEFT configs; "all-linear" is every linear but the output layer:
        # either way, every projection served here.
        if value is None or value == "all-linear":
            return None
    elif not value:
        return None  # PEFT tests `if config.exclude_modules:`
    try:
        return ModuleSelector.parse(value)
    except PatternError as exc:
        raise _config_error(f"{key} {_short(value)} {exc}") from None


def _parse_settings(config: dict[str, Any]) -> _LoraSettings:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _config_error(f"peft_type is {_short(peft_type)}; only 'LORA' adapters are supported")
    for option, reason in _UNSUPPORTED_WHEN_SET.items():
        if _is_set(config.get(option)):
            raise _config_error(f"{reason} (found {option}: {_short(config[option])})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise _config_error(
            f'bias is {_short(bias)}; only "none" is supported (the adapter would change base biases)'
        )
    if "auto_map" in config:
        logger.info("ignoring auto_map in %s: adapter code is never imported", CONFIG_FILE)

    # PEFT's LoraConfig defaults, so that a hand-written config means what PEFT reads it as.
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    if not _positive_int(r):
        raise _config_error(f"r must be a positive integer, got {_short(r)}")
    if not _positive_number(alpha):
        raise _config_error(f"lora_alpha must be a positive finite number, got {_short(alpha)}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _config_error(f"use_rslora must be true or false, got {_short(use_rslora)}")
    use_dora = config.get("use_dora", False)
    if use_dora is not None and not isinstance(use_dora, bool):
        raise _config_error(f"use_dora must be true or false, got {_short(use_dora)}")
    return _LoraSettings(
        r=r,
        alpha=float(alpha),
        use_rslora=use_rslora,
        rank_pattern=_compile_patterns(config, "rank_pattern", integer=True),
        alpha_pattern=_compile_patterns(config, "alpha_pattern", integer=False),
        target_modules=_selector(config, "target_modules"),
        exclude_modules=_selector(config, "exclude_modules"),
        use_dora=bool(use_dora),
    )


def _resolve(
    patterns: tuple[_Pattern, ...], modules: list[str], default: float
) -> dict[str, tuple[float, str | None]]:
    """Module -> (value, key that gave it), the way PEFT resolves rank_pattern/alpha_pattern.

    PEFT takes the FIRST key, in the config's order, whose pattern matches (not the most
    specific one); without a match the module's own name is looked up, then the default.
    """
    first = first_matches([p.compiled for p in patterns], modules)
    by_name = {p.key: p.value for p in patterns}
    out: dict[str, tuple[float, str | None]] = {}
    for module in modules:
        if module in first:
            pattern = patterns[first[module]]
            out[module] = (pattern.value, pattern.key)
        elif module in by_name:
            out[module] = (by_name[module], module)
        else:
            out[module] = (default, None)
    return out


def _find_weights(path: Path) -> Path:
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    try:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and is_pickle_file(p.name))
    except OSError as exc:
        raise AdapterValidationError(
            f"{path.name}: cannot be listed ({exc.strerror})", param="file"
        ) from exc
    if pickles:
        raise AdapterValidationError(
            f"{path.name}: found {', '.join(pickles[:5])} but no {WEIGHTS_FILE}: pickle-based weights are "
            "not accepted; convert to safetensors (e.g. load in PEFT and save_pretrained(safe_serialization=True))",
            param="file",
        )
    raise AdapterValidationError(f"{path.name}: missing {WEIGHTS_FILE}", param="file")


def _unexpected_tensor(key: str) -> AdapterValidationError:
    if "lora_magnitude_vector" in key:
        why = (
            "DoRA magnitudes are read from keys base_model.model.<module path>.lora_magnitude_vector "
            "(as PEFT saves them)"
        )
    elif "lora_embedding" in key:
        why = "LoRA on embedding layers is not supported"
    elif ".lora_B." in key and key.endswith(".bias"):
        why = "lora_B biases (lora_bias) are not supported"
    elif not key.startswith("base_model.model."):
        why = "expected PEFT keys of the form base_model.model.<module path>.lora_A.weight / .lora_B.weight"
    else:
        why = "only lora_A.weight / lora_B.weight tensors of linear projections are supported"
    return AdapterValidationError(f"{WEIGHTS_FILE}: unexpected tensor {key!r}: {why}", param="file")


def _unknown_module(
    key: str, module: str, targets: dict[str, TargetShape]
) -> AdapterValidationError:
    examples = ", ".join(list(targets)[:4])
    parts = module.split(".")
    if ".experts." in f".{module}.":
        why = "MoE expert weights are not served (adapt the attention or dense layers)"
    elif not any(part.isdigit() for part in parts):
        why = (
            "only linear layers inside decoder layers can be adapted (not embeddings or the "
            "output head)"
        )
    else:
        why = "the base model has no such module (adapter made for a different base model?)"
    return AdapterValidationError(
        f"{WEIGHTS_FILE}: tensor {key!r} targets module {module!r}: {why}; "
        f"valid modules are e.g. {examples} ({len(targets)} in total)",
        param="file",
    )


def _group_keys(keys: list[str], targets: dict[str, TargetShape]) -> dict[str, dict[str, str]]:
    """Map module path -> {"lora_A": key, "lora_B": key} (and "lora_magnitude_vector": key for
    DoRA); every key must be a known LoRA weight."""
    pairs: dict[str, dict[str, str]] = {}
    adapter_segments: set[str | None] = set()
    for key in keys:
        match = _KEY_RE.fullmatch(key) or _MAGNITUDE_RE.fullmatch(key)
        if match is None:
            raise _unexpected_tensor(key)
        module, kind = match["module"], match["kind"]
        adapter_segments.add(match["adapter"])
        if len(adapter_segments) > 1:
            shown = sorted(s or "(none)" for s in adapter_segments)
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: tensors mix adapter-name segments {shown}; a file must hold one adapter",
                param="file",
            )
        if module not in targets:
            raise _unknown_module(key, module, targets)
        slot = pairs.setdefault(module, {})
        if kind in slot:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: module {module!r} has two {kind} tensors ({slot[kind]!r} and {key!r})",
                param="file",
            )
        slot[kind] = key
    for module, slot in pairs.items():
        if "lora_A" not in slot and "lora_B" not in slot:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: module {module!r} has a DoRA magnitude "
                f"({slot['lora_magnitude_vector']!r}) but no lora_A / lora_B",
                param="file",
            )
        for kind, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if kind not in slot:
                raise AdapterValidationError(
                    f"{WEIGHTS_FILE}: module {module!r} has {other} ({slot[other]!r}) but no {kind}",
                    param="file",
                )
    return pairs


def _check_targeted(
    pairs: dict[str, dict[str, str]], config: dict[str, Any], settings: _LoraSettings
) -> None:
    """Every module with weights must be one the config's `target_modules` selects.

    PEFT builds LoRA layers from `target_modules` (minus `exclude_modules`) and silently
    drops weights for any other module; serving them would compute something PEFT never
    does. Matching follows PEFT (see `lora.patterns`): a string is a regex that must match
    the whole module path, a list matches a path equal to an entry or ending in `.<entry>`,
    and `all-linear` (or no field) takes every projection.
    """
    targets, excluded = settings.target_modules, settings.exclude_modules
    for module, keys in pairs.items():
        selected = targets is None or targets.selects(module)
        if selected and not (excluded is not None and excluded.selects(module)):
            continue
        shown_excluded = config.get("exclude_modules")
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: tensor {keys['lora_A']!r} is for module {module!r}, but "
            f"{CONFIG_FILE}'s target_modules {_short(config.get('target_modules'))}"
            f"{f' / exclude_modules {_short(shown_excluded)}' if excluded else ''} "
            f"{'excludes it' if selected else 'does not select it'}: "
            "PEFT would ignore these weights",
            param="file",
        )


def _check_dora(pairs: dict[str, dict[str, str]], settings: _LoraSettings) -> None:
    """A DoRA adapter has a magnitude for every adapted module; a plain one has none.

    PEFT ignores (with a warning) magnitudes when `use_dora` is off, and without a saved
    magnitude keeps the one it initialised from the adapter's initial weights, so either
    mismatch would serve something other than what was trained.
    """
    for module, keys in pairs.items():
        magnitude = keys.get("lora_magnitude_vector")
        if magnitude is not None and not settings.use_dora:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: unexpected tensor {magnitude!r}: it is a DoRA magnitude "
                f"vector but {CONFIG_FILE} does not set use_dora: true (PEFT would ignore it)",
                param="file",
            )
        if magnitude is None and settings.use_dora:
            raise AdapterValidationError(
                f"{CONFIG_FILE} sets use_dora: true (DoRA) but {WEIGHTS_FILE} has no "
                f"lora_magnitude_vector for module {module!r} (expected key "
                f"'base_model.model.{module}.lora_magnitude_vector')",
                param="file",
            )


def _as_float32(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: tensor {key!r} has dtype {tensor.dtype}; LoRA weights must be floating point",
            param="file",
        )
    out = tensor.to(torch.float32).contiguous()
    # Checked after the cast: a finite F64 value can overflow to Inf in float32.
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        nan = int(torch.isnan(out).sum())
        inf = int(torch.isinf(out).sum())
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: tensor {key!r} contains non-finite values ({nan} NaN, {inf} Inf, "
            "as float32); the adapter weights are corrupt",
            param="file",
        )
    return out


def _shape_error(key: str, shape: torch.Size, expected: str, detail: str) -> AdapterValidationError:
    return AdapterValidationError(
        f"{WEIGHTS_FILE}: tensor {key!r} has shape {list(shape)}; expected {expected} ({detail})",
        param="file",
    )


def _check_magnitude(module: str, lora: ModuleLoRA, dtype: torch.dtype) -> None:
    """Refuse a module whose delta could overflow `dtype`, from its own weights alone.

    For any input x, with ||M||_inf the largest absolute row sum of M,

        |(scale * B @ A @ x)_i| <= |scale| * ||B||_inf * ||A||_inf * max_j |x_j|

    and ||A||_inf <= in_features * max|A|, ||B||_inf <= r * max|B|, so the gain bounded here
    is at most |scale| * r * max|A| * max|B| * in_features. The intermediate A @ x and the
    scaled B (the engine folds the scale into B) are bounded the same way. Each must stay
    within `magnitude_limit(dtype)`.
    """
    limit = magnitude_limit(dtype)
    # float64 sums: a float32 sum of huge values would itself overflow to inf.
    a_gain = float(lora.a.abs().sum(dim=1, dtype=torch.float64).max())
    b_gain = abs(lora.scale) * float(lora.b.abs().sum(dim=1, dtype=torch.float64).max())
    gain = a_gain * b_gain
    if max(a_gain, b_gain, gain) <= limit:
        return
    raise AdapterValidationError(
        f"{WEIGHTS_FILE}: module {module!r} has weights too large to serve in "
        f"{str(dtype).removeprefix('torch.')}: its output change can reach {gain:.3g} times "
        f"the input's magnitude (scale {lora.scale:.3g}, largest row sums |A| {a_gain:.3g}, "
        f"|B| {b_gain / abs(lora.scale):.3g}), above the bound {limit:.3g} "
        "for serving in this dtype; the adapter's weights are corrupt or diverged in training",
        param="file",
    )


def _build_module(
    module: str,
    keys: dict[str, str],
    tensors: dict[str, torch.Tensor],
    target: TargetShape,
    settings: _LoraSettings,
    config_rank: tuple[float, str | None],
    alpha: float,
    max_rank: int,
    serving_dtype: torch.dtype,
) -> ModuleLoRA:
    a_key, b_key = keys["lora_A"], keys["lora_B"]
    a_raw, b_raw = tensors[a_key], tensors[b_key]
    if a_raw.ndim != 2 or a_raw.shape[1] != target.in_features:
        raise _shape_error(
            a_key,
            a_raw.shape,
            f"[r, {target.in_features}]",
            f"the base module's in_features is {target.in_features}; adapter made for a different base model?",
        )
    r = a_raw.shape[0]
    if r == 0:
        raise _shape_error(
            a_key, a_raw.shape, f"[r, {target.in_features}] with r >= 1", "rank 0 is meaningless"
        )
    if b_raw.ndim != 2 or b_raw.shape[0] != target.out_features:
        raise _shape_error(
            b_key,
            b_raw.shape,
            f"[{target.out_features}, r]",
            f"the base module's out_features is {target.out_features}; adapter made for a different base model?",
        )
    if b_raw.shape[1] != r:
        raise _shape_error(
            b_key, b_raw.shape, f"[{target.out_features}, {r}]", f"lora_A {a_key!r} has rank {r}"
        )
    if r > max_rank:
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: module {module!r} has rank {r}, above this server's limit "
            f"--max-lora-rank={max_rank}",
            param="file",
        )

    config_r, r_key = config_rank
    if r != config_r:
        source = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: module {module!r} has rank {r} but {CONFIG_FILE} gives {source} = {config_r}",
            param="file",
        )
    scale = alpha / math.sqrt(r) if settings.use_rslora else alpha / r
    lora = ModuleLoRA(
        a=_as_float32(a_key, a_raw),
        b=_as_float32(b_key, b_raw),
        scale=float(scale),
        magnitude=_dora_magnitude(keys, tensors, target),
    )
    _check_magnitude(module, lora, serving_dtype)
    return lora


def _dora_magnitude(
    keys: dict[str, str], tensors: dict[str, torch.Tensor], target: TargetShape
) -> torch.Tensor | None:
    """The module's DoRA magnitude `[out_features]` as float32, or None for plain LoRA.

    Its ratio to the row norms of the adapted base weight is only known once the base is
    at hand; the pool checks that when it copies the adapter into a slot.
    """
    key = keys.get("lora_magnitude_vector")
    if key is None:
        return None
    raw = tensors[key]
    if raw.ndim != 1 or raw.shape[0] != target.out_features:
        raise _shape_error(
            key,
            raw.shape,
            f"[{target.out_features}]",
            f"a DoRA magnitude has one entry per output feature of the base module "
            f"({target.out_features})",
        )
    return _as_float32(key, raw)


def load_adapter(
    path: Path,
    *,
    name: str,
    targets: dict[str, TargetShape],
    max_rank: int,
    max_file_bytes: int = 2 * 1024**3,
    serving_dtype: torch.dtype = torch.float32,
    embeddings: EmbeddingTargets | None = None,
) -> LoRAAdapter:
    """Load the PEFT LoRA adapter directory `path` and validate it against `targets`.

    `targets` comes from `adaptable_modules(base_model)`; `max_rank` is the server's
    --max-lora-rank; `max_file_bytes` caps adapter_model.safetensors; `serving_dtype` is the
    dtype the engine computes in, whose range bounds the weights' magnitude
    (`magnitude_limit`); `embeddings` (`full_modules.embedding_targets(base_model)`) lets
    modules_to_save / trainable_token_indices be validated and served (without it such
    adapters are refused). `name` is stored as is (callers validate user-facing names with
    `validate_adapter_name`). Error messages name the directory by its last component only:
    they reach clients, and the registry's location on disk is none of theirs.

    Raises AdapterValidationError naming the file, key or module at fault for anything the
    engine cannot serve exactly as PEFT would compute it.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(
            f"adapter directory {path.name!r} does not exist", param="file"
        )
    weights_path = _find_weights(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterValidationError(f"{path.name}: missing {CONFIG_FILE}", param="file")
    config = _read_config(config_path)
    settings = _parse_settings(config)

    tensors = load_checked_safetensors(weights_path, max_file_bytes=max_file_bytes)
    if not tensors:
        raise AdapterValidationError(f"{WEIGHTS_FILE}: holds no tensors", param="file")
    # Takes the full-module tensors out; what is left must be LoRA weights.
    full_modules = parse_full_modules(config, tensors, embeddings, serving_dtype)
    if not tensors:
        raise AdapterValidationError(
            f"{WEIGHTS_FILE}: holds no LoRA weights (lora_A / lora_B)", param="file"
        )
    pairs = _group_keys(list(tensors), targets)
    _check_targeted(pairs, config, settings)
    _check_dora(pairs, settings)

    # Base-model order, so that consumers iterating the dict see layers in sequence.
    adapted = [m for m in targets if m in pairs]
    ranks = _resolve(settings.rank_pattern, adapted, settings.r)
    alphas = _resolve(settings.alpha_pattern, adapted, settings.alpha)
    modules: dict[str, ModuleLoRA] = {}
    for module in adapted:
        modules[module] = _build_module(
            module,
            pairs[module],
            tensors,
            targets[module],
            settings,
            ranks[module],
            alphas[module][0],
            max_rank,
            serving_dtype,
        )
        # Drop the native-dtype originals as we go to keep peak memory near one copy.
        del tensors[pairs[module]["lora_A"]], tensors[pairs[module]["lora_B"]]

    adapter = LoRAAdapter(
        name=name,
        modules=modules,
        rank=max(m.rank for m in modules.values()),
        config=config,
        source=str(path),
        full_modules=full_modules,
    )
    logger.info(
        "loaded adapter %s from %s: %d modules, max rank %d, %.2f MiB",
        name,
        path,
        len(modules),
        adapter.rank,
        adapter.num_bytes / 2**20,
    )
    return adapter
