"""DoRA (weight-decomposed LoRA) served as a per-slot column scale on top of plain LoRA.

For a DoRA adapter on a linear layer with frozen weight W ``[out, in]``, bias b, LoRA factors
A ``[r, in]``, B ``[out, r]``, scale s and learned magnitude m ``[out]``, HF PEFT computes
(`peft/tuners/lora/dora.py`, ``DoraLinearLayer.forward``; dropout is off at inference)::

    g = m / ||W + s * B @ A||_row            # [out]: L2 norm of each output row, detached
    y = W x + b + (g - 1) * (W x) + g * (s * B @ A @ x)
      = g * (W x + s * B @ A @ x) + b        # the bias stays outside the scale

g depends only on the frozen base and the adapter, so it is computed once per adapter and
module when the adapter is copied into its device slot (`column_scale`), in float32 from the
unpacked base weight. A step then adds the plain LoRA delta for every token (any backend)
and rescales the rows of DoRA tokens with one gathered elementwise op (`apply_dora`)::

    y[t] = scale[row[t]] * y[t] + shift[row[t]]     # scale = g, shift = (1 - g) * b

which is ``g * (y - b) + b``. Tokens of plain LoRA adapters and base rows are not touched
(except in the static decode buffers of CUDA graphs, which route them to row 0, the identity).

Device cost per resident DoRA adapter and packed group: one ``[sum(out_j)]`` scale row, plus
one shift row where the group's base layer has a bias, in the serving dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IDENTITY_ROW = 0
"""Row of every DoRA table that leaves outputs unchanged (scale 1, shift 0): what rows
without a DoRA adapter read where a fixed-shape step must name a row for every token."""

_CHUNK_ELEMENTS = 1 << 22
"""Rows of ``W + s * B @ A`` are formed this many elements at a time (16 MiB in float32),
so a large projection never needs a second full-size float32 copy of its weight."""


@dataclass(frozen=True)
class DoRATables:
    """One packed group's DoRA rows on the device (`IDENTITY_ROW` is row 0)."""

    scale: torch.Tensor
    """``[rows, sum(out_j)]``: g of the adapter in each row; 1 for modules it does not adapt."""
    shift: torch.Tensor | None
    """``[rows, sum(out_j)]``: ``(1 - g) * bias``; None when the group's base has no bias."""


def column_scale(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """PEFT's DoRA factor ``g = m / ||W + scale * B @ A||_row``, in float32 on W's device.

    Args:
        weight: ``[out, in]`` the module's frozen base weight (any dtype, any device).
        a: ``[r, in]``; b: ``[out, r]``; magnitude: ``[out]``.
    Returns:
        ``[out]`` float32. Non-finite where a row of ``W + scale * B @ A`` has norm 0
        (as in PEFT); the caller refuses that.
    """
    device = weight.device
    a = a.to(device, torch.float32)
    b = b.to(device, torch.float32)
    out, in_features = weight.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, in_features))
    norms = torch.empty(out, dtype=torch.float32, device=device)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        # PEFT scales the product (scaling * (B @ A)), not B; kept in that order.
        rows = weight[r0:r1].to(torch.float32) + scale * (b[r0:r1] @ a)
        norms[r0:r1] = torch.linalg.norm(rows, dim=1)
    return magnitude.to(device, torch.float32) / norms


def apply_dora(
    y: torch.Tensor,
    tables: DoRATables,
    tokens: torch.Tensor | None,
    rows: torch.Tensor,
) -> None:
    """Rescale the outputs of DoRA tokens in place, after their LoRA delta was added.

    Args:
        y: ``[T, sum(out_j)]`` base output plus LoRA deltas (modified in place).
        tables: the group's `DoRATables`.
        tokens: ``[n]`` int64 distinct token rows of ``y`` to rescale, or None for every
            row of ``y`` in order (then ``n == T`` and rows without DoRA read row 0).
        rows: ``[n]`` int64 the table row of each of those tokens.

    Semantics: for each i: ``t = tokens[i]`` (or i), ``k = rows[i]``:
    ``y[t] = tables.scale[k] * y[t] + tables.shift[k]`` (shift 0 when None).
    """
    scale = tables.scale.index_select(0, rows)
    shift = tables.shift.index_select(0, rows) if tables.shift is not None else None
    if tokens is None:
        y.mul_(scale)
        if shift is not None:
            y.add_(shift)
        return
    picked = y.index_select(0, tokens)
    picked = torch.addcmul(shift, picked, scale) if shift is not None else picked.mul_(scale)
    y.index_copy_(0, tokens, picked)


def apply_dora_reference(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    token_rows: dict[int, int],
) -> None:
    """Loop reference for `apply_dora`, in PEFT's form: one token at a time, the scale
    applied to the bias-free output and the bias added back.

    Args:
        y: ``[T, sum(out_j)]``, modified in place.
        scale: ``[rows, sum(out_j)]`` g per table row; bias: ``[sum(out_j)]`` or None.
        token_rows: token -> its table row, for DoRA tokens only.
    """
    b = torch.zeros_like(y[0]) if bias is None else bias
    for t, k in token_rows.items():
        y[t] = scale[k] * (y[t] - b) + b
