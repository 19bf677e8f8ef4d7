"""What a run tells its user while it trains: a progress bar, log lines, events.

Only rank 0 reports. The bar (tqdm) shows loss, tokens/s and ETA and turns itself off when
stderr is not a terminal; log lines (every `log_every` steps) and `metrics` events carry the
same figures for logs and for the server's job events.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from trainer.events import EventLog

logger = logging.getLogger("trainer")


class Reporter:
    """Accumulates per-step figures into windows of `log_every` steps."""

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        log_every: int,
        events: EventLog,
        enabled: bool,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self.events = events
        self.enabled = enabled
        self._started = time.perf_counter()
        self._window_start = self._started
        self._window_loss = 0.0
        self._window_steps = 0
        self._window_tokens = 0
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                disable=None,  # off when stderr is not a TTY
            )

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._started) / done * (self.total_steps - step)

    def step(self, step: int, loss: float, lr: float, tokens: int) -> tuple[int, float] | None:
        """Record one optimizer step; returns (step, window mean loss) at a log point."""
        self._window_loss += loss
        self._window_steps += 1
        self._window_tokens += tokens
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            self._bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{self._window_tokens / elapsed:.0f}", refresh=False
            )
            self._bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return None
        now = time.perf_counter()
        mean = self._window_loss / self._window_steps
        tokens_per_s = self._window_tokens / max(now - self._window_start, 1e-9)
        eta = self.eta_s(step)
        if self.enabled:
            message = (
                f"step {step}/{self.total_steps} loss {mean:.4f} lr {lr:.3g} "
                f"tokens/s {tokens_per_s:.0f} eta {_format_eta(eta)}"
            )
            self._log(message)
            self.events.emit(
                "metrics",
                message,
                step=step,
                total_steps=self.total_steps,
                train_loss=mean,
                lr=lr,
                tokens_per_s=tokens_per_s,
                elapsed_s=now - self._started,
                eta_s=None if eta != eta else eta,  # NaN is not JSON
            )
        self._window_loss, self._window_steps, self._window_tokens = 0.0, 0, 0
        self._window_start = now
        return step, mean

    def eval(self, step: int, loss: float) -> None:
        if self.enabled:
            message = f"step {step}/{self.total_steps} eval loss {loss:.4f}"
            self._log(message)
            self.events.emit("eval", message, step=step, eval_loss=loss)

    def checkpoint(self, step: int, path: str) -> None:
        if self.enabled:
            self.events.emit("checkpoint", f"checkpoint saved at step {step}", step=step, path=path)
            logger.debug("checkpoint %s", path)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _log(self, message: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message)
        else:
            logger.info(message)


def _format_eta(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
