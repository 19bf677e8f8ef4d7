"""Merging several LoRA adapters into one, exactly as PEFT's `add_weighted_adapter` does.

A merge is described by a `MergeSpec` (the request's `merged_adapters`: ids, weights,
strategy, density, majority sign method) and computed by `merge_adapters` from the parsed
component adapters. PEFT is the oracle: for the same components, weights, strategy and
density (and, for the `dare_*` strategies, the same random masks) the merged factors equal
those `LoraModel.add_weighted_adapter(..., combination_type=strategy)` writes, including
its rules:

* one component: the strategy becomes `linear`;
* `cat`: per module, A = cat_i(w_i * s_i * A_i), B = cat_i(B_i): the exact weighted sum of
  the deltas as one adapter of summed rank; modules a component does not adapt are skipped;
* `linear` / `ties` / `dare_linear` / `dare_ties`: every component must have the same rank
  (PEFT's "same r value" rule); A and B are combined separately with weights
  sqrt(|w_i * s_i|) (the sign on A's side) through `peft.utils.merge_utils`;
* the merged adapter has r = lora_alpha = the new rank, so its scale is 1 (or sqrt(r) when
  the first component uses rsLoRA: PEFT copies the first component's config);
* target_modules of mixed kinds (a regex string and a list) are refused, as PEFT refuses.

DARE's random masks come from a `torch.Generator` seeded from the merge's key and the
(module, factor, component) they apply to, so the same request always gives the same
merged adapter, whatever order the modules are visited in, without touching the global RNG
that other threads sample from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from adapterhub_server.errors import AdapterValidationError, InvalidRequestError
from adapterhub_server.lora.adapter import (
    LoRAAdapter,
    ModuleLoRA,
    _check_magnitude,
)

if TYPE_CHECKING:
    from adapterhub_server.lora.cache import AdapterLocation

MergeStrategy = Literal["cat", "linear", "ties", "dare_linear", "dare_ties"]
MajoritySignMethod = Literal["total", "frequency"]

MERGE_STRATEGIES: tuple[str, ...] = get_args(MergeStrategy)
MAJORITY_SIGN_METHODS: tuple[str, ...] = get_args(MajoritySignMethod)
MAX_MERGED_ADAPTERS = 8
"""Most components one merge may combine (LoRAX has no limit; a bound keeps the per-request
work and the cat rank in check)."""
MAX_ABS_WEIGHT = 1e4
"""Weights beyond this are refused: they only produce adapters that overflow."""

_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
PARAM = "merged_adapters"
"""The request field every merge error points at."""


class MergeError(AdapterValidationError):
    """The components cannot be merged (PEFT refuses it, or the result cannot be served)."""

    code = "invalid_merge"


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how: the `merged_adapters` request field, validated."""

    ids: tuple[str, ...]
    """Adapter references (`name`, `name@3`, `name@alias`), 1 to `MAX_MERGED_ADAPTERS`."""
    weights: tuple[float, ...]
    """One finite weight per id; negative weights subtract an adapter's effect."""
    strategy: MergeStrategy = "cat"
    """PEFT's combination_type."""
    density: float | None = None
    """Fraction of values kept, in (0, 1]; required by ties, dare_linear and dare_ties."""
    majority_sign_method: MajoritySignMethod = "total"
    """How ties / dare_ties elect each value's sign."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.ids:
            raise InvalidRequestError("merged_adapters.ids must not be empty", param=f"{PARAM}.ids")
        if len(self.ids) > MAX_MERGED_ADAPTERS:
            raise InvalidRequestError(
                f"merged_adapters.ids has {len(self.ids)} adapters; at most "
                f"{MAX_MERGED_ADAPTERS} can be merged per request",
                param=f"{PARAM}.ids",
            )
        if not all(isinstance(i, str) and i for i in self.ids):
            raise InvalidRequestError(
                "merged_adapters.ids must be adapter references", param=f"{PARAM}.ids"
            )
        if len(set(self.ids)) != len(self.ids):
            raise InvalidRequestError(
                "merged_adapters.ids names an adapter twice; give it one combined weight",
                param=f"{PARAM}.ids",
            )
        if len(self.weights) != len(self.ids):
            raise InvalidRequestError(
                f"merged_adapters.weights has {len(self.weights)} entries for "
                f"{len(self.ids)} ids; give one weight per id",
                param=f"{PARAM}.weights",
            )
        for w in self.weights:
            if not math.isfinite(w) or abs(w) > MAX_ABS_WEIGHT:
                raise InvalidRequestError(
                    f"merged_adapters.weights must be finite numbers within ±{MAX_ABS_WEIGHT:g}, "
                    f"got {w}",
                    param=f"{PARAM}.weights",
                )
        if self.strategy not in MERGE_STRATEGIES:
            raise InvalidRequestError(
                f"merged_adapters.merge_strategy {str(self.strategy)[:40]!r} is not one of "
                f"{', '.join(MERGE_STRATEGIES)}",
                param=f"{PARAM}.merge_strategy",
            )
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise InvalidRequestError(
                f"merged_adapters.majority_sign_method {str(self.majority_sign_method)[:40]!r} "
                f"is not one of {', '.join(MAJORITY_SIGN_METHODS)}",
                param=f"{PARAM}.majority_sign_method",
            )
        if self.density is not None:
            if not math.isfinite(self.density) or not 0.0 < self.density <= 1.0:
                raise InvalidRequestError(
                    f"merged_adapters.density must be in (0, 1], got {self.density}",
                    param=f"{PARAM}.density",
                )
            object.__setattr__(self, "density", float(self.density))
        elif self.strategy in _NEEDS_DENSITY and len(self.ids) > 1:
            raise InvalidRequestError(
                f"merged_adapters.density is required by merge_strategy {self.strategy!r}",
                param=f"{PARAM}.density",
            )

    @property
    def effective_strategy(self) -> MergeStrategy:
        """The strategy PEFT applies: a single component is always merged linearly."""
        return "linear" if len(self.ids) == 1 else self.strategy

    def recipe(self, components: Sequence[str]) -> dict[str, Any]:
        """The merge as canonical JSON: `components` (resolved `name@N` keys or content
        identities) in order, with the parameters that change the result."""
        strategy = self.effective_strategy
        return {
            "adapters": list(components),
            "weights": list(self.weights),
            "merge_strategy": strategy,
            "density": self.density if strategy in _NEEDS_DENSITY else None,
            "majority_sign_method": self.majority_sign_method
            if strategy in ("ties", "dare_ties")
            else None,
        }


@dataclass(frozen=True)
class MergeRecipe:
    """A merge whose ids were resolved to adapter locations (what the cache computes)."""

    spec: MergeSpec
    components: tuple[AdapterLocation, ...]


def merge_key(spec: MergeSpec, components: Sequence[str]) -> str:
    """Hex sha256 of the merge: `components` resolved to immutable identities, weights,
    strategy and parameters. Seeds DARE's masks and keys the merge's cached KV."""
    text = json.dumps(spec.recipe(components), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def dare_mask(
    seed_key: str, module: str, factor: str, index: int, shape: torch.Size, density: float
) -> torch.Tensor:
    """The Bernoulli(density) keep-mask DARE applies to component `index`'s `factor`
    ("A" or "B") of `module`, a pure function of its arguments."""
    digest = hashlib.sha256(f"{seed_key}|{module}|{factor}|{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32), generator=gen)


def peft_rank(config: Mapping[str, Any]) -> int:
    """The rank PEFT's add_weighted_adapter assigns a component: r, or the largest of r and
    its rank_pattern values."""
    r = int(config.get("r", 8))
    pattern = config.get("rank_pattern") or {}
    return max(r, *pattern.values()) if pattern else r


def _target_kind(config: Mapping[str, Any]) -> str:
    # PEFT turns a list into a set, and expands "all-linear" (and an absent field) into the
    # set of matching module names, so only a regex string stays a string.
    target = config.get("target_modules")
    return "regex" if isinstance(target, str) and target != "all-linear" else "names"


def _merged_target_modules(adapters: Sequence[LoRAAdapter]) -> str | list[str]:
    """PEFT's new target_modules: the regexes joined with "|", or the union of the names."""
    if _target_kind(adapters[0].config) == "regex":
        return "|".join(f"({a.config['target_modules']})" for a in adapters)
    names: set[str] = set()
    for adapter in adapters:
        target = adapter.config.get("target_modules")
        if isinstance(target, list):
            names.update(t for t in target if isinstance(t, str))
        else:  # absent or all-linear: the leaf names PEFT would expand it to
            names.update(m.rsplit(".", 1)[-1] for m in adapter.modules)
    return sorted(names)


def _refuse_unmergeable(ref: str, config: Mapping[str, Any]) -> None:
    # add_weighted_adapter combines lora_A / lora_B only: a DoRA magnitude, a module copy
    # or trainable token rows would be dropped or reset, silently changing the adapter.
    for option, what in (
        ("use_dora", "DoRA magnitudes"),
        ("modules_to_save", "modules_to_save copies"),
        ("trainable_token_indices", "trainable token rows"),
    ):
        value = config.get(option)
        if value not in (None, False, [], {}, ""):
            raise MergeError(
                f"{ref} has {option}: merging combines plain LoRA factors only and would "
                f"drop its {what}",
                param=PARAM,
            )


def merge_adapters(
    adapters: Sequence[LoRAAdapter],
    spec: MergeSpec,
    *,
    name: str,
    seed_key: str,
    max_rank: int,
    serving_dtype: torch.dtype = torch.float32,
    refs: Sequence[str] | None = None,
) -> LoRAAdapter:
    """Merge `adapters` (parsed, in `spec.ids` order) as PEFT's add_weighted_adapter would.

    `seed_key` seeds DARE's masks (`dare_mask`); `refs` name the components in messages
    (default `spec.ids`). The result's `config` is the adapter_config.json PEFT would save
    for the merged adapter; its modules hold the unpadded factors (a `cat` module adapted by
    fewer components has a smaller rank; PEFT pads it with zero rows).

    Raises `MergeError` for what PEFT refuses, for a merged rank above `max_rank`, and for
    merged weights too large to serve in `serving_dtype`.
    """
    refs = list(refs if refs is not None else spec.ids)
    if len(adapters) != len(spec.ids):
        raise ValueError("one parsed adapter per id is required")
    for ref, adapter in zip(refs, adapters, strict=True):
        _refuse_unmergeable(ref, adapter.config)
    strategy = spec.effective_strategy
    ranks = [peft_rank(a.config) for a in adapters]
    if strategy == "cat":
        new_rank = sum(ranks)
    else:
        if len(set(ranks)) != 1:
            shown = ", ".join(f"{ref}: r={r}" for ref, r in zip(refs, ranks, strict=True))
            raise MergeError(
                f"merge_strategy {strategy!r} needs every adapter to have the same rank "
                f"(PEFT's add_weighted_adapter rule), got {shown}; use 'cat' to merge "
                "adapters of different ranks",
                param=PARAM,
            )
        new_rank = ranks[0]
    kinds = {_target_kind(a.config) for a in adapters}
    if len(kinds) > 1:
        raise MergeError(
            "the adapters' target_modules mix a regex string and a list of module names, "
            "which PEFT's add_weighted_adapter cannot combine",
            param=PARAM,
        )
    if new_rank > max_rank:
        raise MergeError(
            f"the merged adapter would have rank {new_rank} ({strategy} of ranks "
            f"{', '.join(map(str, ranks))}), above this server's --max-lora-rank={max_rank}",
            param=PARAM,
        )

    first = adapters[0].config
    # PEFT gives the new adapter r = lora_alpha = new_rank and keeps use_rslora from the
    # first component's config.
    scale = math.sqrt(new_rank) if first.get("use_rslora") else 1.0
    order: list[str] = []
    for adapter in adapters:
        order.extend(m for m in adapter.modules if m not in order)
    modules: dict[str, ModuleLoRA] = {}
    for module in order:
        present = [
            (i, adapter.modules[module])
            for i, adapter in enumerate(adapters)
            if module in adapter.modules
        ]
        if strategy == "cat":
            a = torch.cat([spec.weights[i] * m.scale * m.a for i, m in present], dim=0)
            b = torch.cat([m.b for _, m in present], dim=1)
        else:
            a, b = _task_arithmetic_factors(module, present, spec, strategy, seed_key, refs)
        merged = ModuleLoRA(a=a.contiguous(), b=b.contiguous(), scale=scale)
        try:
            _check_magnitude(module, merged, serving_dtype)
        except AdapterValidationError as exc:
            raise MergeError(f"the merged adapter: {exc}", param=PARAM) from None
        modules[module] = merged

    config = dict(first)
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_merged_target_modules(adapters),
        alpha_pattern={},
        rank_pattern={},
    )
    return LoRAAdapter(
        name=name,
        modules=modules,
        rank=max(m.rank for m in modules.values()),
        config=config,
        source=f"merge of {', '.join(refs)}",
    )


def _task_arithmetic_factors(
    module: str,
    present: list[tuple[int, ModuleLoRA]],
    spec: MergeSpec,
    strategy: str,
    seed_key: str,
    refs: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_generalized_task_arithmetic_weighted_adapter` for one module."""
    # Imported here: `import peft` pulls in transformers (seconds), which the registry CLI
    # and the adapter cache must not pay for unless a merge actually runs.
    from peft.utils.merge_utils import (
        calculate_majority_sign_mask,
        disjoint_merge,
        reshape_weight_task_tensors,
        task_arithmetic,
        ties,
    )

    shapes = {m.rank for _, m in present}
    if len(shapes) > 1:
        shown = ", ".join(f"{refs[i]}: r={m.rank}" for i, m in present)
        raise MergeError(
            f"module {module!r} has different ranks across the adapters ({shown}); "
            f"merge_strategy {strategy!r} needs equal ranks per module (rank_pattern differs)",
            param=PARAM,
        )
    weights_a, weights_b = [], []
    for i, m in present:
        scaled = spec.weights[i] * m.scale
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    out = []
    for factor, weights in (("A", weights_a), ("B", weights_b)):
        tensors = [m.a if factor == "A" else m.b for _, m in present]
        w = torch.tensor(weights)
        if strategy == "linear":
            merged = task_arithmetic(tensors, w)
        elif strategy == "ties":
            merged = ties(tensors, w, spec.density, spec.majority_sign_method)
        else:
            # PEFT's dare_linear / dare_ties with the random pruning made reproducible: the
            # same keep-masks, then PEFT's own rescaling, sign election and merge.
            density = float(spec.density)  # type: ignore[arg-type]
            if density < 1.0:
                tensors = [
                    t * dare_mask(seed_key, module, factor, i, t.shape, density) / density
                    for (i, _), t in zip(present, tensors, strict=True)
                ]
            if strategy == "dare_linear":
                merged = task_arithmetic(tensors, w)
            else:
                stacked = torch.stack(tensors, dim=0)
                sign_mask = calculate_majority_sign_mask(stacked, method=spec.majority_sign_method)
                weighted = stacked * reshape_weight_task_tensors(stacked, w)
                merged = disjoint_merge(weighted, sign_mask)
        out.append(merged.to(tensors[0].dtype))
    return out[0], out[1]


def padded_state_dict(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    """The merged adapter's tensors in PEFT's file layout, each module zero-padded to the
    config's rank as PEFT's own merged adapter is (so PEFT and this server load it)."""
    r = int(adapter.config["r"])
    tensors: dict[str, torch.Tensor] = {}
    for module, m in adapter.modules.items():
        a = torch.zeros(r, m.in_features)
        b = torch.zeros(m.out_features, r)
        a[: m.rank] = m.a
        b[:, : m.rank] = m.b
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    return tensors
