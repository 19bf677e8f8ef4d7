"""Adapter kinds beyond plain LoRA: DoRA, `modules_to_save` and trainable token rows.

The trainer trains through PEFT (`trainer.modeling.build_model`), so each kind's math
(DoRA's magnitude and detached column norm, the full copy of a saved module, the token-row
delta shared with a tied head) and its file layout are PEFT's own. What this module adds is
the part PEFT leaves to the caller: checking the options against the base before any weight
loads, with messages that name the option, and turning them into `LoraConfig` arguments.

The checks take `EmbeddingFacts`, not a model, so that the server's fine-tuning API
(`adapterhub_server.finetune`) applies the same rules at job creation from the meta-device
model it already builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.config import MODULES_TO_SAVE, TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class EmbeddingFacts:
    """What the kinds need to know about a base's token embeddings and output head."""

    input_name: str
    """Module path of the input embeddings (`model.embed_tokens`)."""
    output_name: str | None
    """Module path of the output head (`lm_head`); None when the model has none."""
    vocab_size: int
    """Rows of the input embedding table: the bound for `trainable_token_indices`."""
    tied: bool
    """`tie_word_embeddings`: the head shares the input embeddings' weight. PEFT decides
    tying from this config flag, so the same flag is used here."""

    @classmethod
    def of(cls, model: nn.Module) -> EmbeddingFacts:
        """The facts of a transformers CausalLM (loaded or on the meta device)."""
        inputs = model.get_input_embeddings()  # type: ignore[operator]
        outputs = model.get_output_embeddings()  # type: ignore[operator]
        names = {id(module): name for name, module in model.named_modules()}
        config = getattr(model, "config", None)
        return cls(
            input_name=names[id(inputs)],
            output_name=names.get(id(outputs)) if outputs is not None else None,
            vocab_size=int(inputs.weight.shape[0]),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


def check_against_base(config: TrainConfig, facts: EmbeddingFacts) -> None:
    """Refuse kind options the base cannot take, before anything loads or is queued.

    Raises:
        TrainConfigError: `modules_to_save` names a module this base does not hold under
            that name, a token index is outside its vocabulary, or the tied head would be
            both a trained copy and a carrier of trainable rows (param = the option).
    """
    if not config.is_lora:
        return
    where = {"lm_head": facts.output_name, "embed_tokens": facts.input_name}
    for name in config.modules_to_save:
        path = where[name]
        role = MODULES_TO_SAVE[name]
        if path is None:
            raise TrainConfigError(
                f"modules_to_save: this base has no {role} to train as {name!r}",
                param="modules_to_save",
            )
        if path.rpartition(".")[2] != name:
            # PEFT matches modules_to_save by module name, and servers accept only these
            # two names: a head under another name could not be saved as `lm_head`.
            raise TrainConfigError(
                f"modules_to_save: this base's {role} is the module {path!r}, not {name!r}; "
                "only bases whose output head is lm_head and input embeddings embed_tokens "
                "can save them",
                param="modules_to_save",
            )
    outside = [i for i in config.trainable_token_indices if i >= facts.vocab_size]
    if outside:
        raise TrainConfigError(
            f"trainable_token_indices: {', '.join(map(str, outside))} outside the vocabulary "
            f"of this base (indices 0 to {facts.vocab_size - 1})",
            param="trainable_token_indices",
        )
    if facts.tied and config.trainable_token_indices and "lm_head" in config.modules_to_save:
        # On a tied base PEFT gives the head the embedding's token rows too, which would
        # wrap the head's full trained copy in a second adapter.
        raise TrainConfigError(
            "trainable_token_indices: this base ties lm_head to embed_tokens, so the token "
            "rows already change the head; drop lm_head from modules_to_save or the indices",
            param="trainable_token_indices",
        )


def lora_kind_arguments(config: TrainConfig) -> dict[str, Any]:
    """The `LoraConfig` arguments for `config`'s kind options (PEFT's defaults when unset,
    so a plain LoRA's adapter_config.json stays as it was)."""
    return {
        "use_dora": config.dora,
        "modules_to_save": list(config.modules_to_save) or None,
        "trainable_token_indices": list(config.trainable_token_indices) or None,
    }


def describe_kind(config: TrainConfig) -> str:
    """A few words naming the kind options in use ("" for plain LoRA)."""
    parts = []
    if config.dora:
        parts.append("DoRA")
    if config.modules_to_save:
        parts.append("modules_to_save " + ",".join(config.modules_to_save))
    if config.trainable_token_indices:
        count = len(config.trainable_token_indices)
        parts.append(f"{count} trainable token row{'s' if count > 1 else ''}")
    return ", ".join(parts)
