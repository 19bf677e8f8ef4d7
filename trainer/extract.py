"""LoRA from a full fine-tune: truncated SVD of each target module's weight delta.

For a module with base weight W0 [out, in] and fine-tuned W1, delta = W1 - W0 = U S Vh; the
best rank-k approximation in Frobenius norm (Eckart-Young) is U_k S_k Vh_k. It is stored as
PEFT LoRA factors B = U_k sqrt(S_k) [out, k] and A = sqrt(S_k) Vh_k [k, in] with
lora_alpha = r = k (scale 1), so that W0 + B A is the approximation. The share of the delta
kept is the retained Frobenius energy sum(S_k^2) / sum(S^2).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger("trainer")


@dataclass(frozen=True)
class ModuleExtraction:
    """The factors and the retained energy of one module."""

    lora_a: torch.Tensor
    """[k, in]"""
    lora_b: torch.Tensor
    """[out, k]"""
    energy: float
    """Retained share of the delta's squared Frobenius norm, in [0, 1] (1 for a zero delta)."""
    delta_norm_sq: float
    """Squared Frobenius norm of the full delta."""


def extract_module(delta: torch.Tensor, rank: int) -> ModuleExtraction:
    """Best rank-`rank` factors of `delta` [out, in] (computed in float64 for the SVD)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    root = s[:k].sqrt()
    return ModuleExtraction(
        lora_a=(root[:, None] * vh[:k]).float().contiguous(),
        lora_b=(u[:, :k] * root[None, :]).float().contiguous(),
        energy=kept / total if total > 0 else 1.0,
        delta_norm_sq=total,
    )


@dataclass(frozen=True)
class Extraction:
    """A PEFT LoRA adapter approximating a full fine-tune."""

    rank: int
    modules: dict[str, ModuleExtraction]
    """PEFT module path (`base_model.model.model.layers.0.self_attn.q_proj`) -> factors."""
    target_modules: tuple[str, ...]
    untracked: dict[str, float]
    """Trained parameters outside the target modules (embeddings, norms, lm_head) -> relative
    change ||W1 - W0|| / ||W0||: what the adapter cannot carry."""

    @property
    def energy(self) -> float:
        """Retained energy over all modules: sum of kept / sum of total squared norms."""
        total = sum(m.delta_norm_sq for m in self.modules.values())
        kept = sum(m.energy * m.delta_norm_sq for m in self.modules.values())
        return kept / total if total > 0 else 1.0

    def energy_by_module(self) -> dict[str, float]:
        return {name: round(m.energy, 6) for name, m in self.modules.items()}

    def save(self, directory: Path, base_model_name: str) -> Path:
        """Write the PEFT directory: adapter_config.json + adapter_model.safetensors."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            tensors[f"{name}.lora_A.weight"] = m.lora_a
            tensors[f"{name}.lora_B.weight"] = m.lora_b
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.rank,
            "lora_alpha": self.rank,
            "lora_dropout": 0.0,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
            "init_lora_weights": True,
        }
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory


def extract_lora(
    before: dict[str, torch.Tensor],
    model: torch.nn.Module,
    target_modules: tuple[str, ...],
    rank: int,
) -> Extraction:
    """Factor the delta of every linear module whose leaf name is in `target_modules`."""
    modules: dict[str, ModuleExtraction] = {}
    untracked: dict[str, float] = {}
    targets = set(target_modules)

    def is_target(name: str, p: torch.Tensor) -> bool:
        module, _, leaf = name.rpartition(".")
        return leaf == "weight" and p.dim() == 2 and module.rpartition(".")[2] in targets

    # One rank for every module (PEFT's `r`): capped by the smallest target dimension.
    smallest = min(
        (min(p.shape) for name, p in model.named_parameters() if is_target(name, p)),
        default=rank,
    )
    rank = min(rank, smallest)
    for name, p in model.named_parameters():
        delta = p.detach().float().cpu() - before[name]
        if is_target(name, p):
            modules[f"base_model.model.{name.rpartition('.')[0]}"] = extract_module(delta, rank)
        elif bool(delta.any()):
            untracked[name] = float(delta.norm() / before[name].norm().clamp_min(1e-12))
    if not modules:
        raise ValueError(f"no linear module named {', '.join(target_modules)} in the model")
    found = {name.rpartition(".")[2] for name in modules}
    extraction = Extraction(rank, modules, tuple(sorted(found)), untracked)
    logger.info(
        "extracted rank-%d LoRA from %d modules: %.2f%% of the delta's energy retained",
        rank,
        len(modules),
        100 * extraction.energy,
    )
    if untracked:
        worst = max(untracked.items(), key=lambda kv: kv[1])
        logger.warning(
            "%d trained tensors outside the target modules are not in the adapter "
            "(largest relative change %.2e in %s)",
            len(untracked),
            worst[1],
            worst[0],
        )
    return extraction
