"""The training loop: AdamW with warmup + cosine/linear decay over a BatchPlan, periodic eval
and checkpoints, resume, a clean stop on Ctrl-C / SIGTERM, data parallel under torchrun.

Plain PyTorch, deterministic for a given seed on a given device: `torch.manual_seed` fixes the
LoRA initialisation and dropout, (seed, epoch) fixes the data order, and a checkpoint holds the
generator state, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.batching import BatchPlan, collate
from trainer.checkpoint import (
    Progress,
    load_checkpoint,
    prune_checkpoints,
    remove_checkpoints,
    save_checkpoint,
)
from trainer.checkpoint_paths import latest_checkpoint
from trainer.config import TrainConfig, TrainConfigError, auto_epochs
from trainer.data import Example
from trainer.distributed import DistInfo
from trainer.events import EventLog
from trainer.modeling import CausalLMLoss, trainable_parameters
from trainer.progress import Reporter
from trainer.sharding import set_gradient_sync

logger = logging.getLogger("trainer")


@dataclass
class TrainResult:
    """What a finished run produced."""

    model: Any
    """The trained model (PeftModel for LoRA), in eval mode."""
    steps: int
    """Optimizer steps taken (including those before a resume)."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss over the steps since the previous entry), one per log point and
    always one for the last step."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) at each evaluation; empty without eval data."""
    trained_tokens: int = 0
    """Tokens the loss covered, summed over all steps and ranks."""
    seen_tokens: int = 0
    """Non-padding tokens run through the model, all ranks."""
    wall_time_s: float = 0.0
    """Seconds in the loop (model loading excluded), summed over resumed sessions."""
    resumed_from_step: int = 0
    """The checkpoint's step when the run was resumed, else 0."""

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None


class TrainingInterrupted(Exception):
    """The run stopped early on request; `checkpoint` resumes it."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """Set by SIGINT / SIGTERM (or by a caller); the loop stops after the current step.

    A second Ctrl-C aborts at once (the default handler, KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handle(signum: int, frame: Any) -> None:
            if self.requested and signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.requested = True
            logger.warning(
                "stopping after this step and saving a checkpoint (Ctrl-C again to abort)"
            )

        for sig in previous:
            signal.signal(sig, handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def lr_lambda(total_steps: int, warmup_steps: int, scheduler: str) -> Callable[[int], float]:
    """Multiplier of the peak lr for `LambdaLR`, as a function of the steps already taken.

    Linear rise over `warmup_steps` (step k of the warmup uses (k+1)/warmup_steps, so no step
    is wasted at lr 0), then cosine or linear decay that reaches 0 after the last step.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_plan(config: TrainConfig, examples: Sequence[Example], info: DistInfo) -> BatchPlan:
    return BatchPlan(
        [len(e.input_ids) for e in examples],
        batching=config.batching,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_seq_len=config.max_seq_len,
        seed=config.seed,
        world_size=info.world_size,
        rank=info.rank,
    )


def plan_steps(config: TrainConfig, plan: BatchPlan) -> tuple[int, int]:
    """(total optimizer steps, warmup steps)."""
    if config.max_steps is not None:
        return config.max_steps, math.ceil(config.warmup_ratio * config.max_steps)
    epochs = config.epochs or auto_epochs(len(plan.lengths), config.batch_size, config.grad_accum)
    total = plan.total_steps(epochs)
    return total, math.ceil(config.warmup_ratio * total)


def train(
    model: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_id: int,
    *,
    eval_examples: Sequence[Example] = (),
    fingerprint: dict[str, Any] | None = None,
    info: DistInfo | None = None,
    events: EventLog | None = None,
    stop: StopRequest | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run the optimisation; returns the trained model and its history.

    The loss of a step is the mean cross-entropy over every trained token of its micro-batches
    on every rank (token-weighted, so gradient accumulation and data parallelism equal one big
    batch). `fingerprint` names what a resumed checkpoint must share with this run.
    `on_step(step)` runs after each optimizer step (tests use it to request a stop).

    Raises:
        TrainingInterrupted: a stop was requested; a checkpoint was saved first.
        TrainConfigError: `config.resume` without a usable checkpoint.
    """
    info = info or DistInfo()
    events = events or EventLog(None)
    stop = stop or StopRequest()
    fingerprint = fingerprint or {}
    device = next(p.device for p in model.parameters())
    plan = make_plan(config, examples, info)
    total_steps, warmup_steps = plan_steps(config, plan)
    sharded = info.enabled and not config.is_lora
    autocast = torch.bfloat16 if device.type == "cuda" and not config.is_lora else None
    loss_module = CausalLMLoss(model, autocast_dtype=None if sharded else autocast)
    runner: torch.nn.Module = loss_module
    if sharded:
        from trainer.sharding import shard_full_sft

        runner = shard_full_sft(loss_module, device)  # before the optimizer: params change
    elif info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    named = trainable_parameters(model)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, config.scheduler)
    )

    checkpoint_dir = config.resolved_checkpoint_dir()
    progress = Progress()
    if config.resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise TrainConfigError(
                f"resume: no complete checkpoint in {checkpoint_dir}", param="resume"
            )
        progress = load_checkpoint(
            found, params=named, optimizer=optimizer, schedule=schedule, fingerprint=fingerprint
        )
    elif info.is_main and latest_checkpoint(checkpoint_dir) is not None:
        logger.warning("removing checkpoints of an earlier run in %s", checkpoint_dir)
        remove_checkpoints(checkpoint_dir)
    resumed_from = progress.step

    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    message = (
        f"training {len(examples)} examples for {total_steps} steps (warmup {warmup_steps}) "
        f"on {device} x{info.world_size}: {n_trainable} trainable of {n_total} parameters "
        f"({100.0 * n_trainable / max(1, n_total):.3f}%)"
        + (f", resuming at step {resumed_from}" if resumed_from else "")
    )
    if info.is_main:
        logger.info(message)
        events.emit(
            "started",
            message,
            total_steps=total_steps,
            examples=len(examples),
            eval_examples=len(eval_examples),
            trainable_parameters=n_trainable,
            total_parameters=n_total,
            method=config.method,
            device=str(device),
            resumed_from_step=resumed_from,
        )
    eval_every = config.eval_every or max(1, total_steps // 5)
    reporter = Reporter(
        total_steps=total_steps,
        start_step=resumed_from,
        log_every=config.log_every,
        events=events,
        enabled=info.is_main,
    )

    def save() -> Path | None:
        # Every rank takes part: sharded tensors are gathered (a collective); rank 0 writes.
        path = save_checkpoint(
            checkpoint_dir,
            params=named,
            optimizer=optimizer,
            schedule=schedule,
            progress=progress,
            fingerprint=fingerprint,
            write=info.is_main,
        )
        if path is not None:
            prune_checkpoints(checkpoint_dir, keep=path)
            reporter.checkpoint(progress.step, str(path))
        distributed.barrier(info)
        return path

    steps = plan.steps(progress.step)
    model.train()
    session_start = time.perf_counter()
    wall_before = progress.wall_time_s
    try:
        with stop.installed():
            while progress.step < total_steps:
                batches = [collate(mb, examples, pad_id) for mb in next(steps).micro_batches]
                trained, real = distributed.sum_floats(
                    info,
                    device,
                    sum(b.trained_tokens for b in batches),
                    sum(b.real_tokens for b in batches),
                )
                loss_sum = 0.0
                for i, batch in enumerate(batches):
                    batch = batch.to(device)
                    sync = i == len(batches) - 1 or not info.enabled
                    if sharded:
                        set_gradient_sync(runner, sync)
                    with (
                        contextlib.nullcontext() if sync or sharded else runner.no_sync()  # type: ignore[operator]
                    ):
                        loss = runner(batch.inputs, batch.labels)
                        # DDP averages gradients over ranks: scale so the result is the
                        # token-weighted mean over the whole global batch.
                        (loss * (info.world_size / max(trained, 1.0))).backward()
                    loss_sum += float(loss.detach())
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                (loss_sum,) = distributed.sum_floats(info, device, loss_sum)
                step_loss = loss_sum / max(trained, 1.0)
                progress.step += 1
                progress.trained_tokens += int(trained)
                progress.seen_tokens += int(real)
                logged = reporter.step(
                    progress.step, step_loss, schedule.get_last_lr()[0], int(real)
                )
                if logged is not None:
                    progress.losses.append(logged)
                if eval_examples and (
                    progress.step % eval_every == 0 or progress.step == total_steps
                ):
                    value = evaluate(runner, eval_examples, config, pad_id, info, split=not sharded)
                    progress.eval_losses.append((progress.step, value))
                    reporter.eval(progress.step, value)
                    model.train()
                progress.wall_time_s = wall_before + time.perf_counter() - session_start
                if on_step is not None:
                    on_step(progress.step)
                # A collective on every step, so all ranks stop at the same one.
                stopping = distributed.any_rank(info, device, stop.requested)
                if stopping and progress.step < total_steps:
                    path = save()
                    if info.is_main:
                        events.emit(
                            "interrupted",
                            f"stopped at step {progress.step}; checkpoint saved",
                            level="warning",
                            step=progress.step,
                            checkpoint=str(path) if path else None,
                        )
                    raise TrainingInterrupted(progress.step, path)
                if (
                    config.save_every
                    and progress.step % config.save_every == 0
                    and progress.step < total_steps
                ):
                    save()
    finally:
        reporter.close()
    model.eval()
    if not config.keep_checkpoints and info.is_main:
        remove_checkpoints(checkpoint_dir)
    result = TrainResult(
        model=model,
        steps=progress.step,
        losses=progress.losses,
        eval_losses=progress.eval_losses,
        trained_tokens=progress.trained_tokens,
        seen_tokens=progress.seen_tokens,
        wall_time_s=progress.wall_time_s,
        resumed_from_step=resumed_from,
    )
    if info.is_main:
        logger.info(
            "done: %d steps, final loss %.4f, %d trained tokens, %.1f s (%.0f tokens/s)",
            result.steps,
            result.final_loss if result.final_loss is not None else float("nan"),
            result.trained_tokens,
            result.wall_time_s,
            result.seen_tokens / max(result.wall_time_s, 1e-9),
        )
    return result


@torch.no_grad()
def evaluate(
    loss_module: torch.nn.Module,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_id: int,
    info: DistInfo,
    *,
    split: bool = True,
) -> float:
    """Token-weighted mean loss over `examples` (dropout off).

    With `split` the examples are shared out over ranks; a sharded (FSDP) model needs every
    rank in every forward, so there each rank evaluates them all.
    """
    loss_module.train(False)
    device = next(p.device for p in loss_module.parameters())
    if not split:
        info = DistInfo()
    mine = list(range(info.rank, len(examples), info.world_size))
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(mine), config.batch_size):
        rows = [[index] for index in mine[start : start + config.batch_size]]
        batch = collate(rows, examples, pad_id).to(device)
        loss_sum += float(loss_module(batch.inputs, batch.labels))
        tokens += batch.trained_tokens
    loss_sum, tokens_f = distributed.sum_floats(info, device, loss_sum, tokens)
    return loss_sum / max(tokens_f, 1.0)
