"""The training loop: PEFT LoRA over a frozen causal LM, AdamW, warmup + cosine/linear decay.

Plain PyTorch, deterministic for a given seed on a given device: `torch.manual_seed` fixes the
LoRA initialisation and dropout, a seeded generator fixes the data order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, Example, collate

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    model: Any
    """The PeftModel with the trained adapter (in eval mode)."""
    steps: int
    """Optimizer steps taken."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss over the steps since the previous entry), one per log point and
    always one for the last step."""
    trained_tokens: int = 0
    """Tokens the loss covered, summed over all steps."""
    seen_tokens: int = 0
    """Non-padding tokens run through the model."""
    wall_time_s: float = 0.0
    """Seconds in the loop (model loading excluded)."""

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def pick_device(spec: str | None) -> torch.device:
    """`spec` as given, else CUDA when available, else CPU."""
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def build_model(base_path: Path, config: TrainConfig, device: torch.device) -> Any:
    """Load the frozen base (float32 on CPU, bfloat16 on CUDA) and wrap it with fresh LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    base.config.use_cache = False
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.rslora,
        bias="none",
    )
    torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
    model = get_peft_model(base, lora)
    return model.to(device)


def plan_steps(config: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps)."""
    batches_per_epoch = math.ceil(num_examples / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    return total, math.ceil(config.warmup_ratio * total)


def _groups(loader: DataLoader, grad_accum: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless micro-batch groups, `grad_accum` per optimizer step; an epoch's last group may
    be shorter. The loader reshuffles (from its seeded generator) every epoch."""
    while True:
        group: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group


def train(model: Any, examples: Sequence[Example], config: TrainConfig, pad_id: int) -> TrainResult:
    """Run the optimisation; returns the trained model and its loss history.

    The loss of a step is the mean cross-entropy over every trained token of its micro-batches
    (token-weighted, so gradient accumulation equals one big batch).
    """
    device = next(p.device for p in model.parameters())
    total_steps, warmup_steps = plan_steps(config, len(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "training %d examples for %d steps (warmup %d) on %s: %d trainable of %d parameters (%.3f%%)",
        len(examples),
        total_steps,
        warmup_steps,
        device,
        n_trainable,
        n_total,
        100.0 * n_trainable / max(1, n_total),
    )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, config.scheduler)
    )
    loader = DataLoader(
        list(examples),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=lambda batch: collate(batch, pad_id),
    )
    result = TrainResult(model=model, steps=0)
    model.train()
    start = time.perf_counter()
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, start
    groups = _groups(loader, config.grad_accum)
    for step in range(1, total_steps + 1):
        group = next(groups)
        n_trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
        step_loss = 0.0
        for batch in group:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss_sum = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (loss_sum / n_trained).backward()
            step_loss += loss_sum.item() / n_trained
            window_tokens += int(batch["attention_mask"].sum())
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps = step
        result.trained_tokens += n_trained
        window_loss += step_loss
        window_steps += 1
        if step % config.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            mean = window_loss / window_steps
            result.losses.append((step, mean))
            result.seen_tokens += window_tokens
            logger.info(
                "step %d/%d loss %.4f lr %.3g tokens/s %.0f",
                step,
                total_steps,
                mean,
                schedule.get_last_lr()[0],
                window_tokens / max(now - window_start, 1e-9),
            )
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, now
    result.wall_time_s = time.perf_counter() - start
    model.eval()
    logger.info(
        "done: %d steps, final loss %.4f, %d trained tokens, %.1f s (%.0f tokens/s)",
        result.steps,
        result.final_loss if result.final_loss is not None else float("nan"),
        result.trained_tokens,
        result.wall_time_s,
        result.seen_tokens / max(result.wall_time_s, 1e-9),
    )
    return result
