"""A step's grammar masks: filled on a worker thread during the forward, applied to logits.

llguidance writes one bit per token (``[R, W]`` int32 words, W = ceil(vocab / 32); token v
is allowed iff bit v % 32 of word v // 32 is set), for all constrained rows in one call
that drops the GIL, so the fill runs beside the forward pass. The sampler adds the
unpacked mask as a ``[R, V]`` float bias of 0 (allowed) or -inf (forbidden): adding 0
leaves an allowed logit bit-identical, and unconstrained rows are never touched.

On CPU the bias is built on the worker with numpy (single-threaded, GIL released), which
keeps torch's thread pool to the forward; on CUDA the packed words cross to the device
(W ints a row instead of V floats) and are unpacked there.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from adapterhub_server.engine.structured.compiler import GrammarMatcher
from adapterhub_server.models.transfer import to_device

NEG_INF_BITS = -8388608
"""0xFF800000 as a signed int32: the bit pattern of float32 -inf."""


@dataclass(frozen=True)
class TokenMasks:
    """The grammar masks of one step's constrained rows, on the logits' device."""

    rows: torch.Tensor
    """``[R]`` int64: which rows of the step's ``[B, V]`` logits are constrained (unique)."""
    bias: torch.Tensor
    """``[R, V]`` float32: 0 where the row's grammar allows the token, -inf where not."""


def mask_logits(logits: torch.Tensor, masks: TokenMasks) -> None:
    """Forbid, in place, the tokens each constrained row's grammar does not allow.

    Args:
        logits: ``[B, V]`` float32, modified in place.
    Semantics: for r, i in enumerate(masks.rows): logits[i] += masks.bias[r]
    (allowed entries unchanged, forbidden ones -inf; other rows untouched).
    """
    logits.index_add_(0, masks.rows, masks.bias)


def _bias_from_bits(packed: np.ndarray, vocab: int) -> np.ndarray:
    """``[R, W]`` int32 packed masks -> ``[R, vocab]`` float32 bias (0 / -inf), in numpy."""
    # Token 32w + 8k + j is bit j of byte k of word w in little-endian byte order.
    as_bytes = packed.astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=1, count=vocab, bitorder="little")
    # bit 1 -> 0 & pattern = 0.0; bit 0 -> -1 & pattern = -inf: no branch, no multiply.
    return ((bits.astype(np.int32) - 1) & NEG_INF_BITS).view(np.float32)


def _bias_on_device(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, W]`` int32 packed masks on the device -> ``[R, vocab]`` float32 bias."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    bits = bits.view(packed.shape[0], -1)[:, :vocab]
    return ((bits - 1) & NEG_INF_BITS).view(torch.float32)


_Filled = tuple[np.ndarray, dict[int, str]]


class PendingMasks:
    """Masks being filled for one step; `wait` returns them on the device."""

    def __init__(
        self, future: Future[_Filled], rows: list[int], vocab: int, device: torch.device
    ) -> None:
        self._future = future
        self._rows = rows
        self._vocab = vocab
        self._device = device

    def wait(self) -> tuple[TokenMasks, dict[int, str]]:
        """The masks, and the rows (step batch index -> message) whose matcher failed;
        those rows must not be answered from their (meaningless) mask."""
        filled, failed = self._future.result()
        rows = to_device(self._rows, torch.long, self._device)
        if self._device.type == "cpu":
            bias = torch.from_numpy(filled)
        else:
            bias = _bias_on_device(
                to_device(torch.from_numpy(filled), torch.int32, self._device), self._vocab
            )
        return TokenMasks(rows, bias), {self._rows[j]: msg for j, msg in failed.items()}

    def discard(self) -> None:
        """Wait until the fill is no longer running (the step failed): the matchers must
        be quiet before the retry fills them again or the next step advances them."""
        if not self._future.cancel():
            self._future.exception()


class MaskFiller:
    """Fills the constrained rows' bitmasks of a step on one worker thread."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        """`vocab_size`: the logits' width V (the masks cover at least that many tokens)."""
        self.vocab_size = vocab_size
        self.device = device
        # llguidance spreads one batch over its own native threads.
        self._executor = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def start(self, rows: list[int], matchers: Sequence[GrammarMatcher]) -> PendingMasks:
        """Begin filling the masks of `matchers`, those of the step's batch rows `rows`."""
        inner = [m._matcher for m in matchers]
        words = (matchers[0].vocab_size + 31) // 32
        future = self._worker.submit(self._fill, inner, words)
        return PendingMasks(future, rows, self.vocab_size, self.device)

    def _fill(self, matchers: list[llguidance.LLMatcher], words: int) -> _Filled:
        packed = np.empty((len(matchers), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, j) for j, m in enumerate(matchers)], packed.ctypes.data, words * 4, len(matchers)
        )
        failed = {
            j: m.get_error() or "the grammar matcher failed"
            for j, m in enumerate(matchers)
            if m.is_error()
        }
        if self.device.type == "cpu":
            return _bias_from_bits(packed, self.vocab_size), failed
        return packed, failed

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
