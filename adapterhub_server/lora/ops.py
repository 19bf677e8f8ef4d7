"""Batched multi-LoRA ops: the one import point for every LoRA kernel.

Device-resident adapter weights are kept per *rank class* (the next power of two >= the
adapter's rank, so padding wastes at most 2x) and per *packed group*: the m projections that
read the same input (q/k/v, or gate/up) share one A tensor, so one shrink serves all of them.
For a group and class ``c``:

* ``A``: ``[slots, m * c, in]``; module j's A (zero-padded to ``c`` rows) is rows
  ``[j * c, (j + 1) * c)``;
* ``B_j``: ``[slots, c, out_j]`` per module, its B transposed, with the LoRA scale folded in
  (as vLLM does), so the op needs no per-slot scale vector.

Semantics, for every token t routed to ``(c, slot)`` and every module j of the group, whose
output columns in ``y`` are ``[o_j, o_j + out_j)``::

    y[t, o_j : o_j + out_j] += (A[c][slot, j*c:(j+1)*c] @ x[t]) @ B_j[c][slot]

Two routing forms, whose best strategies differ (measured by ``bench/lora_ops.py``):

* *grouped* (decode: one token per sequence, mixed adapters): tokens are gathered into a
  ``[slots, L, in]`` block, one ``bmm`` shrinks, one expands, one ``index_add_`` scatters back.
  Five ops per module per rank class whatever the number of adapters (BGMV-like); the
  adapters' weights are read once, never copied per token.
* *segments* (prefill: runs of tokens sharing one adapter): one shrink and one expand per
  segment on views of the slot (SGMV-like).

Tokens with no adapter appear in no group and no segment, so they pay nothing; a step in
which no token uses an adapter does no LoRA work at all.

DoRA adapters (`lora/dora.py`) are plain LoRA here plus one rescale of their tokens' rows
after the delta is added, whatever the backend; `LoRABatch` lists those tokens and their
DoRA table rows once per step (`dora_tokens`, `dora_rows`).

On CPU (float32 or bfloat16) the dense tokens, and those of prefill chunks shorter than
`GEMM_MIN_TOKENS`, go instead through one fused C kernel call per rank class
(`lora/cpu_kernel.py`): the grouped torch ops above cost about ten dispatches per adapted
layer, which on a decode step weighed more than the adapter weights they read.
The torch ops remain the fallback (no C compiler, other dtypes) and, with
`add_lora_reference`, the oracle the kernel is tested against.

On CUDA the same semantics run as two Triton kernels per rank class (`lora/triton_ops.py`,
custom ops `torch.ops.adapterhub.lora_shrink` / `lora_expand`). Which of the three serves
an engine is a `LoRABackend` object (`TORCH_OPS`, `CPU_KERNEL`, `TRITON_KERNELS`), chosen
once by `lora_backend`; it decides how a step's tokens are routed (`LoRABackend.route`),
and `add_lora` runs whatever that routing holds. The grouping of tokens by adapter itself
has one writer, `lora/routing.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from adapterhub_server.lora.cpu_kernel import (
    ACTIVATION_DTYPES,
    CpuMapping,
    add_lora_cpu,
    build_cpu_mappings,
)
from adapterhub_server.lora.cpu_kernel import load as load_cpu_kernel
from adapterhub_server.lora.routing import Route, group_routes, rank_class
from adapterhub_server.lora.triton_ops import (
    KernelMapping,
    add_lora_kernels,
    build_kernel_mappings,
    triton_available,
)
from adapterhub_server.models.transfer import to_device

__all__ = ["Route", "rank_class"]  # re-exported: callers import the LoRA API from here

PackedPool = tuple[torch.Tensor, tuple[torch.Tensor, ...]]
"""``(A [slots, m * c, in], (B_0 [slots, c, out_0], ..., B_{m-1}))`` for one rank class."""


GEMM_MIN_TOKENS = 64
"""Tokens on one adapter (dense, or one prefill chunk) from which the torch ops (a GEMM
pair on that adapter) beat the CPU kernel, whose dot-product loops are built for a few
tokens per adapter (measured by ``bench/lora_ops.py --decode-step``: a step of 64 tokens
all on one adapter, 18 ms vs 20 ms; 16 tokens, 6.4 vs 7.0; 64 tokens over 8 adapters, 32
vs 23)."""


@dataclass
class TokenGroup:
    """Dense tokens of one rank class, laid out ``[slot_hi - slot_lo, L]`` by slot."""

    rank_class: int
    slot_lo: int
    slot_hi: int
    token_index: torch.Tensor
    """``[S, L]`` int64 token positions; padding points at token 0 and is zeroed by `valid`."""
    flat_index: torch.Tensor
    """``[S * L]`` the same, flattened, for the scatter."""
    valid: torch.Tensor | None
    """``[S, L, 1]`` 1.0 for real tokens, 0.0 for padding; None when there is no padding."""
    contiguous: tuple[int, int] | None
    """``(t0, t1)`` when the group is one slot over a contiguous token range (no gather)."""


@dataclass
class Segment:
    """A run of tokens ``[t0, t1)`` that all use one adapter (a prefill chunk)."""

    t0: int
    t1: int
    rank_class: int
    slot: int


@dataclass
class LoRABatch:
    """Per-step LoRA routing, built once per engine step and shared by every layer."""

    groups: list[TokenGroup] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    kernel_mappings: list[KernelMapping] = field(default_factory=list)
    """Set instead of groups and segments when the Triton kernels serve this step."""
    cpu_mappings: list[CpuMapping] = field(default_factory=list)
    """The dense tokens the CPU kernel serves; `groups` then holds only those of adapters
    with `GEMM_MIN_TOKENS` or more."""
    dora_tokens: torch.Tensor | None = None
    """``[n]`` int64 the tokens of DoRA adapters (dense and prefill, distinct); None with
    `dora_rows` set: every token, in order (the static decode buffers)."""
    dora_rows: torch.Tensor | None = None
    """``[n]`` int64 each such token's row in the DoRA tables; None: no DoRA this step."""

    @property
    def active(self) -> bool:
        return bool(self.groups or self.segments or self.kernel_mappings or self.cpu_mappings)


def build_lora_batch(
    dense_routes: Sequence[Route | None],
    segments: Sequence[Segment] = (),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: LoRABackend | None = None,
    dora_rows: Mapping[Route, int] | None = None,
) -> LoRABatch:
    """Build one step's routing.

    Args:
        dense_routes: per dense token, in token order (tokens ``0..len-1``), its
            ``(rank_class, slot)`` or None for the base model.
        segments: prefill runs that use an adapter; their token ranges follow the dense ones.
        backend: the engine's `LoRABackend` (`lora_backend` chooses it once per engine);
            None: `TORCH_OPS`.
        dora_rows: route of each resident DoRA adapter -> its DoRA table row
            (`LoRAWeightPool.dora_rows`); routes not in it are plain LoRA.
    """
    batch = (backend or TORCH_OPS).route(dense_routes, segments, device=device, dtype=dtype)
    if dora_rows:
        _add_dora_routing(batch, dense_routes, segments, dora_rows, device)
    return batch


def _add_dora_routing(
    batch: LoRABatch,
    dense_routes: Sequence[Route | None],
    segments: Sequence[Segment],
    dora_rows: Mapping[Route, int],
    device: torch.device | str,
) -> None:
    """Set ``batch.dora_tokens`` / ``dora_rows`` to the step's DoRA tokens, if any."""
    tokens: list[int] = []
    rows: list[int] = []
    for t, route in enumerate(dense_routes):
        row = dora_rows.get(route) if route is not None else None
        if row is not None:
            tokens.append(t)
            rows.append(row)
    for s in segments:
        row = dora_rows.get((s.rank_class, s.slot))
        if row is not None:
            tokens.extend(range(s.t0, s.t1))
            rows.extend([row] * (s.t1 - s.t0))
    if tokens:
        packed = to_device(tokens + rows, torch.long, device)  # one transfer
        batch.dora_tokens, batch.dora_rows = packed[: len(tokens)], packed[len(tokens) :]


class LoRABackend:
    """How an engine's batched LoRA runs, for all its steps: the routing a step builds
    (`route`), which `add_lora` then executes. One instance per kind (`TORCH_OPS`,
    `CPU_KERNEL`, `TRITON_KERNELS`); `lora_backend` picks one at start."""

    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    """Whether decode steps may replay CUDA graphs with it (fixed-shape routing tables)."""

    def route(
        self,
        dense_routes: Sequence[Route | None],
        segments: Sequence[Segment],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> LoRABatch:
        """One step's shrink/expand routing (no DoRA: `build_lora_batch` adds that)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<LoRABackend {self.name}>"


class TorchOps(LoRABackend):
    """The grouped torch ops: dense tokens gathered per rank class, prefill segments as
    views of their slot. Any device and dtype; the reference the kernels are tested on."""

    name = "torch"

    def route(
        self,
        dense_routes: Sequence[Route | None],
        segments: Sequence[Segment],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> LoRABatch:
        groups = _token_groups(group_routes(dense_routes), device, dtype)
        return LoRABatch(groups=groups, segments=list(segments))


class CpuKernel(LoRABackend):
    """The fused C kernel for every adapter's tokens, dense or from short prefill chunks,
    while it has fewer than `GEMM_MIN_TOKENS` of them in the step; torch ops for busier
    adapters and for prefill chunks of `GEMM_MIN_TOKENS` or more. float32 or bfloat16 on CPU.

    Short prefill chunks join the dense tokens because, as segments, each would cost one
    shrink and an expand per module in every adapted layer: 16 chat prompts over 8
    adapters spent 80 ms of their 300 ms prefill step dispatching those small GEMMs,
    against about 20 ms when each adapter's tokens go out as one kernel call or GEMM pair
    (measured on the default model)."""

    name = "cpu"

    def route(
        self,
        dense_routes: Sequence[Route | None],
        segments: Sequence[Segment],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> LoRABatch:
        if torch.device(device).type != "cpu" or dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"the CPU LoRA kernel cannot serve {dtype} on {device}")
        batch = LoRABatch()
        short: list[Segment] = []
        for s in segments:
            (short if s.t1 - s.t0 < GEMM_MIN_TOKENS else batch.segments).append(s)
        routes = _with_segments(dense_routes, short)
        # Grouped before the loop clears the GEMM adapters' tokens from `routes`.
        for cls, slots in group_routes(routes).items():
            for slot, tokens in slots.items():
                if len(tokens) >= GEMM_MIN_TOKENS:
                    batch.groups += _token_groups({cls: {slot: tokens}}, device, dtype)
                    for t in tokens:
                        routes[t] = None
        batch.cpu_mappings = build_cpu_mappings(routes)
        return batch


def _with_segments(
    dense_routes: Sequence[Route | None], segments: Sequence[Segment]
) -> list[Route | None]:
    """`dense_routes` extended by the tokens of `segments` (None for every other token
    after the dense ones); a new list."""
    routes = list(dense_routes)
    if segments:
        routes += [None] * (max(s.t1 for s in segments) - len(routes))
        for s in segments:
            routes[s.t0 : s.t1] = [(s.rank_class, s.slot)] * (s.t1 - s.t0)
    return routes


class TritonKernels(LoRABackend):
    """The Triton kernels on CUDA: every token, dense or prefill, chunked by adapter."""

    name = "triton"
    supports_cuda_graphs = True

    def route(
        self,
        dense_routes: Sequence[Route | None],
        segments: Sequence[Segment],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> LoRABatch:
        routes: list[Route | None] = list(dense_routes)
        for s in segments:
            routes += [None] * (s.t0 - len(routes)) + [(s.rank_class, s.slot)] * (s.t1 - s.t0)
        return LoRABatch(kernel_mappings=build_kernel_mappings(routes, device))


TORCH_OPS = TorchOps()
CPU_KERNEL = CpuKernel()
TRITON_KERNELS = TritonKernels()
BACKENDS: dict[str, LoRABackend] = {b.name: b for b in (TORCH_OPS, CPU_KERNEL, TRITON_KERNELS)}
"""Each backend by its `lora_kernel` name."""


def lora_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    weights: torch.dtype | None = None,
) -> LoRABackend:
    """The backend an engine uses for all its steps, chosen once at start.

    Args:
        requested: ``auto`` (Triton on CUDA when installed; the CPU kernel for float32 or
            bfloat16 on CPU where it builds; else torch), or ``triton``, ``cpu``, ``torch``
            (required: an error where it cannot serve).
        dtype: the activations' dtype; weights: the adapter weights' (default `dtype`).
    """
    weights = weights or dtype
    cpu_serves = device.type == "cpu" and dtype in ACTIVATION_DTYPES
    if requested == "torch":
        return TORCH_OPS
    if requested == "triton":
        if weights != dtype:
            raise ValueError(f"lora_kernel='triton' reads {dtype} weights, not {weights}")
        if not triton_available():
            raise ValueError("lora_kernel='triton' but Triton is not installed")
        return TRITON_KERNELS
    if requested == "cpu":
        if not cpu_serves:
            raise ValueError(
                f"lora_kernel='cpu' serves float32 or bfloat16 on CPU, not {dtype} on {device}"
            )
        if load_cpu_kernel(weights, dtype) is None:
            raise ValueError(
                "lora_kernel='cpu' but the CPU LoRA kernel cannot be built here (it needs a "
                "C compiler, Linux and torch's GNU OpenMP; see the log)"
            )
        return CPU_KERNEL
    if requested != "auto":
        raise ValueError(f"unknown lora_kernel {requested!r}")
    if device.type == "cuda" and triton_available():
        return TRITON_KERNELS
    if cpu_serves and load_cpu_kernel(weights, dtype) is not None:
        return CPU_KERNEL
    return TORCH_OPS


def _token_groups(
    by_class: Mapping[int, Mapping[int, list[int]]],
    device: torch.device | str,
    dtype: torch.dtype,
) -> list[TokenGroup]:
    """One `TokenGroup` per rank class, from class -> slot -> its token positions."""
    groups = []
    for cls, slots in sorted(by_class.items()):
        lo, hi = min(slots), max(slots) + 1
        if len(slots) == 1:
            (tokens,) = slots.values()
            if tokens == list(range(tokens[0], tokens[-1] + 1)):
                empty = torch.empty(0, dtype=torch.long, device=device)
                groups.append(
                    TokenGroup(cls, lo, hi, empty, empty, None, (tokens[0], tokens[-1] + 1))
                )
                continue
        width = max(len(ts) for ts in slots.values())
        # Built as Python lists and converted once: this runs every step, and one tensor
        # construction beats a small tensor and an indexed copy per slot.
        per_slot = [slots.get(slot, []) for slot in range(lo, hi)]
        index = torch.tensor([ts + [0] * (width - len(ts)) for ts in per_slot], dtype=torch.long)
        padded = any(len(ts) < width for ts in per_slot)
        valid = None
        if padded:
            valid = torch.tensor(
                [[1.0] * len(ts) + [0.0] * (width - len(ts)) for ts in per_slot], dtype=dtype
            ).unsqueeze(-1)
        groups.append(
            TokenGroup(
                rank_class=cls,
                slot_lo=lo,
                slot_hi=hi,
                token_index=to_device(index, torch.long, device),
                flat_index=to_device(index.flatten(), torch.long, device),
                valid=to_device(valid, dtype, device) if valid is not None else None,
                contiguous=None,
            )
        )
    return groups


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, PackedPool],
    batch: LoRABatch,
) -> None:
    """Add every routed token's LoRA delta to ``y`` in place.

    Args:
        y: ``[T, sum(out_j)]`` output of the frozen base layer(s) (modified in place).
        x: ``[T, in]`` input shared by the group's modules.
        pools: rank class ``c`` -> ``(A [slots, m * c, in], (B_j [slots, c, out_j], ...))``.
        batch: this step's routing.

    Semantics: for each token t routed to (c, s), each module j:
    ``y[t, cols_j] += (A[c][s, j*c:(j+1)*c] @ x[t]) @ B_j[c][s]``.
    """
    if batch.kernel_mappings:
        add_lora_kernels(y, x, pools, batch.kernel_mappings)
        return
    if batch.cpu_mappings:
        add_lora_cpu(y, x, pools, batch.cpu_mappings)
    for g in batch.groups:
        a, bs = pools[g.rank_class]
        c = g.rank_class
        a = _widened(a[g.slot_lo : g.slot_hi], x.dtype)
        if g.contiguous is not None:
            t0, t1 = g.contiguous
            h = x[t0:t1] @ a[0].T  # [n, m * c]
            _expand_into(y[t0:t1], h, [_widened(b[g.slot_lo], x.dtype) for b in bs], c)
            continue
        xg = x[g.token_index]  # [S, L, in]
        h = torch.bmm(xg, a.transpose(1, 2))  # [S, L, m * c]
        if g.valid is not None:
            h.mul_(g.valid)
        outs = [
            torch.bmm(h[..., j * c : (j + 1) * c], _widened(b[g.slot_lo : g.slot_hi], x.dtype))
            for j, b in enumerate(bs)
        ]  # each [S, L, out_j]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        y.index_add_(0, g.flat_index, out.view(-1, out.shape[-1]))
    for s in batch.segments:
        a, bs = pools[s.rank_class]
        h = x[s.t0 : s.t1] @ _widened(a[s.slot], x.dtype).T  # [len, m * c]
        _expand_into(y[s.t0 : s.t1], h, [_widened(b[s.slot], x.dtype) for b in bs], s.rank_class)


def _widened(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A pool slice in the activations' dtype: weights kept in another (`lora_dtype`) are
    converted slice by slice, only the slots a call reads. The check comes first because
    ``Tensor.to`` costs about a microsecond even when there is nothing to convert, and the
    torch ops make a few of these calls per layer per step."""
    return weights if weights.dtype == dtype else weights.to(dtype)


def _expand_into(y: torch.Tensor, h: torch.Tensor, bs: list[torch.Tensor], c: int) -> None:
    """``y[:, cols_j] += h[:, j*c:(j+1)*c] @ bs[j]`` for a run of tokens on one adapter.

    Args:
        y: ``[n, sum(out_j)]``; h: ``[n, m * c]``; bs[j]: ``[c, out_j]``.
    """
    if len(bs) == 1:
        y.addmm_(h, bs[0])
        return
    o = 0
    for j, b in enumerate(bs):
        y[:, o : o + b.shape[1]].addmm_(h[:, j * c : (j + 1) * c], b)
        o += b.shape[1]


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    pools: Mapping[int, PackedPool],
    routes: Sequence[Route | None],
) -> None:
    """Loop reference for ``add_lora``: one token and one module at a time, no batching.

    Args:
        y: ``[T, sum(out_j)]``, modified in place.
        x: ``[T, in]``.
        pools: as for ``add_lora``.
        routes: per token, ``(rank_class, slot)`` or None.
    """
    for t, route in enumerate(routes):
        if route is None:
            continue
        c, slot = route
        a, bs = pools[c]
        o = 0
        for j, b in enumerate(bs):
            h = _widened(a[slot, j * c : (j + 1) * c], x.dtype) @ x[t]
            y[t, o : o + b.shape[-1]] += h @ _widened(b[slot], x.dtype)
            o += b.shape[-1]
