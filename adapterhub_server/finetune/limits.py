"""What a fine-tuning job is checked against when it is created: the server's limits and the
base model it trains.

A job that could never finish, or could only fail later (a billion epochs, a rank the server
cannot serve, a module the base model does not have), is refused with a 400 naming the field
before anything is queued; see `hyperparameters.plan_training`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_server.config import DEFAULT_MAX_FINE_TUNING_TOKENS
from adapterhub_server.errors import BaseModelError

if TYPE_CHECKING:
    from trainer import EmbeddingFacts

MAX_SEED = 2**32 - 1
"""Largest `seed` of a job: the trainer derives per-epoch seeds from it, which must stay
within the 64 bits torch's generators take."""


@dataclass(frozen=True)
class FineTuningLimits:
    """Upper bounds on what one job may ask for."""

    max_fine_tuning_tokens: int = DEFAULT_MAX_FINE_TUNING_TOKENS
    """Most tokens a job may train on, examples x epochs x tokens per example, estimated
    from the files' statistics at creation (`--max-fine-tuning-tokens`; see
    `ServerConfig.max_fine_tuning_tokens` for the default's reasoning)."""
    max_lora_rank: int = 64
    """Largest LoRA rank (and `extract_rank` of full fine-tuning): the server's
    `--max-lora-rank`, so that every result can be served."""
    max_epochs: int = 100
    """Most passes over the data (OpenAI allows 50)."""
    max_steps: int = 1_000_000
    """Most optimizer steps of a job that sets `max_steps`."""
    max_batch_size: int = 256
    """Most sequences per micro-batch (OpenAI allows 256)."""
    max_grad_accum: int = 256
    """Most micro-batches per optimizer step."""
    max_learning_rate: float = 1.0
    """Highest peak learning rate (method default x `learning_rate_multiplier`): far above
    any that trains (1e-3 is the LoRA default); beyond it the weights only diverge."""

    def __post_init__(self) -> None:
        for name in (
            "max_fine_tuning_tokens",
            "max_lora_rank",
            "max_epochs",
            "max_steps",
            "max_batch_size",
            "max_grad_accum",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.max_learning_rate < float("inf"):
            raise ValueError(f"max_learning_rate must be > 0, got {self.max_learning_rate!r}")


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model that jobs fine-tune: the one the server serves."""

    model_id: str
    """The id clients use (`model` of a job must equal it)."""
    path: Path
    """Its resolved local HF directory, handed to the trainer."""
    context_length: int | None = None
    """Its context window (`max_position_embeddings`): the largest `max_seq_len` of a job.
    None: unknown, only the trainer's own checks apply."""
    target_modules: frozenset[str] | None = None
    """Leaf names of the linear modules the trainer adapts on it (`q_proj`, ..., Phi-3's
    `qkv_proj`; not those PEFT would move onto MoE experts): what `lora_target_modules` may
    name, besides `all-linear`. None: unknown, not checked."""
    embeddings: EmbeddingFacts | None = None
    """Its token embeddings and head (vocabulary size, names, tying): what
    `modules_to_save` and `trainable_token_indices` are checked against. None: unknown,
    the trainer checks them when the job runs."""

    @classmethod
    def from_directory(cls, path: Path, model_id: str) -> BaseModelInfo:
        """The info of a local HF-format model directory, from its `config.json` alone: the
        modules are those of the family's transformers class built on the meta device, as
        the registry lists them (`registry.targets`), so any decoder family is covered.

        Raises:
            BaseModelError: the config cannot be read, or is not that of a decoder-only
                causal LM transformers implements.
        """
        from adapterhub_server.registry.targets import meta_model_from_config, targets_from_config
        from trainer import ALL_LINEAR, EmbeddingFacts, TrainConfigError, resolve_target_modules

        try:
            config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"cannot read the base model's config.json: {exc}") from None
        if not isinstance(config, dict):
            raise BaseModelError("the base model's config.json is not a JSON object")
        context = config.get("max_position_embeddings")
        targets_from_config(config)  # refuses a config the engine cannot serve
        # What the trainer will adapt: on mixture-of-experts bases PEFT moves some names
        # (Qwen-MoE's gate_proj/up_proj/down_proj) onto the unserved expert weights, so those
        # must be refused here, at job creation, not by the trainer minutes later.
        meta = meta_model_from_config(config)
        try:
            trainable = resolve_target_modules((ALL_LINEAR,), meta)
        except TrainConfigError as exc:
            raise BaseModelError(f"the base model cannot be fine-tuned: {exc}") from exc
        return cls(
            model_id=model_id,
            path=Path(path),
            context_length=context if isinstance(context, int) and context > 1 else None,
            target_modules=frozenset(trainable),
            embeddings=EmbeddingFacts.of(meta),
        )
