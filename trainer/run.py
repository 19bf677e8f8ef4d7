"""One training run from a `TrainConfig`: data, model, loop, then save and publish.

`run_train` is what `trainer train` and the server's fine-tuning jobs execute. Under torchrun
every rank runs it; only rank 0 writes events, files and registry versions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapterhub_server.errors import AdapterHubError
from trainer import distributed
from trainer.config import FINGERPRINT_FIELDS, TrainConfig, auto_epochs
from trainer.events import EventLog
from trainer.loop import StopRequest, TrainingInterrupted, TrainResult

if TYPE_CHECKING:
    from adapterhub_server.base_model import ResolvedBaseModel
    from trainer.extract import Extraction

logger = logging.getLogger("trainer")


@dataclass
class TrainOutcome:
    """What `run_train` produced."""

    ref: str | None
    """The published registry reference (`name@version`), or None when nothing was pushed."""
    result: TrainResult
    """Steps, loss history, token counts and wall time of the training loop."""
    output_dir: Path | None = None
    """Where the PEFT directory (LoRA) or the fine-tuned model (full) was written."""
    energy: float | None = None
    """Full SFT: the retained Frobenius energy of the extracted LoRA."""


def run_train(
    config: TrainConfig,
    *,
    events_path: Path | None = None,
    stop: StopRequest | None = None,
    on_step: Any = None,
) -> TrainOutcome:
    """Train and save/publish; every failure is also reported as a `failed` event.

    Raises:
        AdapterHubError: bad data or settings (nothing written).
        TrainingInterrupted: stopped on request after saving a checkpoint.
    """
    info = distributed.from_environment()
    events = EventLog(events_path if info.is_main else None)
    try:
        return _run(config, info, events, stop, on_step)
    except TrainingInterrupted:
        raise
    except AdapterHubError as exc:
        events.emit("failed", exc.message, level="error", error=exc.message)
        raise
    except BaseException as exc:
        events.emit("failed", f"{type(exc).__name__}: {exc}", level="error", error=str(exc))
        raise
    finally:
        events.close()
        distributed.shutdown(info)


def _run(
    config: TrainConfig,
    info: distributed.DistInfo,
    events: EventLog,
    stop: StopRequest | None,
    on_step: Any,
) -> TrainOutcome:
    from transformers import AutoTokenizer

    from adapterhub_server.base_model import resolve_base_model
    from adapterhub_server.registry import BaseModelSpec, meta_model_from_dir
    from trainer import loop
    from trainer.data import load_examples, sha256_file
    from trainer.kinds import EmbeddingFacts, check_against_base
    from trainer.modeling import build_model, pick_device, resolve_target_modules

    dataset_sha256 = sha256_file(config.data)
    eval_sha256 = sha256_file(config.eval_data) if config.eval_data else None
    base = resolve_base_model(config.base_model, model_id=config.base_model_id)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    # Everything about the data is checked before the model loads or anything is written.
    examples = load_examples(config.data, tokenizer, config.max_seq_len)
    eval_examples = (
        load_examples(config.eval_data, tokenizer, config.max_seq_len) if config.eval_data else []
    )
    if config.epochs is None and config.max_steps is None:
        epochs = auto_epochs(len(examples), config.batch_size * info.world_size, config.grad_accum)
        config = dataclasses.replace(config, epochs=epochs)
        if info.is_main:
            logger.info("epochs: auto -> %d for %d examples", epochs, len(examples))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    spec = BaseModelSpec.from_directory(base.path, base.model_id)
    # Names checked and `all-linear` resolved on a meta-device model, before the weights
    # load; the lineage, the resume fingerprint and the extraction see the leaf names.
    meta = meta_model_from_dir(base.path)
    targets = resolve_target_modules(config.target_modules, meta)
    config = dataclasses.replace(config, target_modules=targets)
    check_against_base(config, EmbeddingFacts.of(meta))
    del meta
    if info.is_main:
        logger.info("base model %s (%s) at %s", base.model_id, base.source, base.path)
    device = pick_device(config.device, info.local_rank)
    distributed.init(info, device)
    torch.manual_seed(config.seed)
    model = build_model(base.path, config, device)
    fingerprint = {name: config.to_dict()[name] for name in FINGERPRINT_FIELDS} | {
        "base_model": spec.fingerprint,
        "data": dataset_sha256,
        "eval_data": eval_sha256,
        "world_size": info.world_size,
    }
    result = loop.train(
        model,
        examples,
        config,
        pad_id,
        eval_examples=eval_examples,
        fingerprint=fingerprint,
        info=info,
        events=events,
        stop=stop,
        on_step=on_step,
    )
    if info.enabled and not config.is_lora:
        result.model = _gather_sharded(result.model, base.path, info)
    outcome = TrainOutcome(ref=None, result=result, output_dir=config.output_dir)
    if info.is_main:
        finish = _Finish(
            config=config,
            base=base,
            result=result,
            events=events,
            lineage_args={
                "dataset_sha256": dataset_sha256,
                "eval_sha256": eval_sha256,
                "device": device,
                "world_size": info.world_size,
            },
        )
        if config.is_lora:
            finish.lora(outcome)
        else:
            finish.full(outcome, tokenizer)
        events.emit(
            "succeeded",
            f"training finished: {result.steps} steps"
            + (f", published {outcome.ref}" if outcome.ref else ""),
            steps=result.steps,
            trained_tokens=result.trained_tokens,
            train_loss=result.final_loss,
            eval_loss=result.eval_loss,
            ref=outcome.ref,
            output_dir=str(config.output_dir) if config.output_dir else None,
            wall_time_s=result.wall_time_s,
        )
        _announce(config, outcome)
    distributed.barrier(info)
    return outcome


def _gather_sharded(model: Any, base_path: Path, info: distributed.DistInfo) -> Any:
    """An FSDP-trained model as one plain float32 model on rank 0 (None elsewhere).

    Every rank takes part in the gather; rank 0 copies the whole tensors into a freshly
    loaded model, by parameter name (tied weights appear once in both).
    """
    from transformers import AutoModelForCausalLM

    from trainer.sharding import full_tensor

    whole = {name: full_tensor(p) for name, p in model.named_parameters()}
    if not info.is_main:
        return None
    plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(whole[name])
    return plain.eval()


@dataclass
class _Finish:
    """Rank 0's work after the loop: write files, extract (full SFT), publish."""

    config: TrainConfig
    base: ResolvedBaseModel
    result: TrainResult
    events: EventLog
    lineage_args: dict[str, Any]

    def lora(self, outcome: TrainOutcome) -> None:
        from trainer import publish

        model = self.result.model
        if self.config.output_dir is not None:
            publish.save_adapter(model, self.config.output_dir)
        self._publish(outcome, lambda d: publish.save_adapter(model, d), self.config.r, None)

    def full(self, outcome: TrainOutcome, tokenizer: Any) -> None:
        from transformers import AutoModelForCausalLM

        from trainer import publish
        from trainer.extract import extract_lora

        config, model = self.config, self.result.model
        assert config.output_dir is not None  # TrainConfig requires it for full SFT
        publish.save_full_model(model, tokenizer, config.output_dir)
        # The base weights come back from disk rather than from a copy held through training.
        original = AutoModelForCausalLM.from_pretrained(self.base.path, dtype=torch.float32)
        before = {name: p.detach() for name, p in original.named_parameters()}
        extraction = extract_lora(before, model, config.target_modules, config.extract_rank)
        del original, before
        extraction.save(config.output_dir / "extracted-lora", self.base.model_id)
        outcome.energy = extraction.energy
        self.events.emit(
            "extracted",
            f"extracted a rank-{extraction.rank} LoRA keeping "
            f"{100 * extraction.energy:.2f}% of the weight delta's energy",
            rank=extraction.rank,
            energy=extraction.energy,
            modules=len(extraction.modules),
        )
        self._publish(
            outcome,
            lambda d: extraction.save(d, self.base.model_id),
            extraction.rank,
            extraction,
        )

    def _publish(
        self,
        outcome: TrainOutcome,
        write: Callable[[Path], Path],
        rank: int,
        extraction: Extraction | None,
    ) -> None:
        from trainer import publish

        if self.config.name is None:
            return
        lineage = publish.build_lineage(
            self.config, self.result, extraction=extraction, **self.lineage_args
        )
        record = publish.publish_adapter(
            write,
            self.config,
            self.base,
            lineage,
            publish.describe(self.config, self.base, self.result.steps, rank),
        )
        outcome.ref = record.key
        self.events.emit(
            "published",
            f"published {record.key}",
            ref=record.key,
            alias=self.config.alias,
        )


def _announce(config: TrainConfig, outcome: TrainOutcome) -> None:
    """The lines a CLI user reads at the end of a run."""
    if outcome.energy is not None:
        print(f"extracted LoRA keeps {100 * outcome.energy:.2f}% of the weight delta's energy")
    if config.output_dir is not None:
        print(f"saved {config.output_dir}")
    if outcome.ref is not None:
        suffix = f" (alias {config.alias})" if config.alias else ""
        print(f"published {outcome.ref}{suffix}")
