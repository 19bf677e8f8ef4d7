"""Per-sequence logit changes before a token is chosen: penalties, bias, min_tokens.

They run batched over the rows that ask for any of them (`SamplingParams.processes_logits`);
rows that ask for none are not touched, so their choice is bit-identical to a batch without
processed rows. The order is vLLM's: min_tokens and logit_bias, then the repetition, then
the frequency and presence penalties; temperature and the top-k / top-p / min-p filters
come after, in `Sampler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.models.transfer import to_device


@dataclass(frozen=True)
class SamplingContext:
    """What a row's processors read besides its logits."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    """Tokens generated so far (the penalties count these; min_tokens compares its length)."""
    stop_ids: frozenset[int]
    """Token ids that end this sequence (EOS unless ignored, plus `stop_token_ids`):
    what `min_tokens` masks."""


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    contexts: Sequence[SamplingContext],
) -> torch.Tensor:
    """Apply each row's penalties, bias and min_tokens mask.

    Args:
        logits: ``[B, V]`` float32 raw logits (not modified).
        params, contexts: B each; row i uses params[i] and contexts[i].
    Returns:
        ``[B, V]`` float32: a new tensor when any row is processed, else `logits` itself.

    Semantics, for each row i with p = params[i], c = contexts[i], and each token v:
        if len(c.output_ids) < p.min_tokens and v in c.stop_ids: l[v] = -inf
        l[v] += dict(p.logit_bias).get(v, 0)
        if v in c.prompt_ids or v in c.output_ids:
            l[v] = l[v] / p.repetition_penalty if l[v] > 0 else l[v] * p.repetition_penalty
        n = c.output_ids.count(v)
        l[v] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    """
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    device = logits.device
    vocab = logits.shape[1]
    out = logits.clone()
    idx = to_device(rows, torch.long, device)
    sub = out.index_select(0, idx)  # [R, V]
    sub_params = [params[i] for i in rows]
    sub_ctx = [contexts[i] for i in rows]

    # min_tokens and logit_bias: sparse (row, token, value) updates, one scatter each.
    mask_rows, mask_cols = [], []
    bias_rows, bias_cols, bias_vals = [], [], []
    for r, (p, c) in enumerate(zip(sub_params, sub_ctx)):
        if len(c.output_ids) < p.min_tokens:
            ids = [t for t in c.stop_ids if t < vocab]
            mask_rows += [r] * len(ids)
            mask_cols += ids
        for token, bias in p.logit_bias:
            if token < vocab:
                bias_rows.append(r)
                bias_cols.append(token)
                bias_vals.append(bias)
    if mask_rows:
        sub[to_device(mask_rows, torch.long, device), to_device(mask_cols, torch.long, device)] = (
            float("-inf")
        )
    if bias_rows:
        sub.index_put_(
            (to_device(bias_rows, torch.long, device), to_device(bias_cols, torch.long, device)),
            to_device(bias_vals, torch.float32, device),
            accumulate=True,
        )

    reps = [p.repetition_penalty for p in sub_params]
    if any(r != 1.0 for r in reps):
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen_rows: list[int] = []
        seen_cols: list[int] = []
        for r, (p, c) in enumerate(zip(sub_params, sub_ctx)):
            if p.repetition_penalty != 1.0:
                ids = {*c.prompt_ids, *c.output_ids}
                seen_rows += [r] * len(ids)
                seen_cols += ids
        if seen_rows:
            seen[
                to_device(seen_rows, torch.long, device), to_device(seen_cols, torch.long, device)
            ] = True
        penalty = to_device(reps, torch.float32, device).unsqueeze(1)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalised, sub)

    if any(p.frequency_penalty or p.presence_penalty for p in sub_params):
        counts = torch.zeros_like(sub)
        count_rows: list[int] = []
        count_cols: list[int] = []
        for r, c in enumerate(sub_ctx):
            count_rows += [r] * len(c.output_ids)
            count_cols += c.output_ids
        if count_rows:
            counts.index_put_(
                (
                    to_device(count_rows, torch.long, device),
                    to_device(count_cols, torch.long, device),
                ),
                torch.ones(len(count_rows), device=device),
                accumulate=True,
            )
        freq = to_device([p.frequency_penalty for p in sub_params], torch.float32, device)
        pres = to_device([p.presence_penalty for p in sub_params], torch.float32, device)
        sub = sub - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).float()

    out.index_copy_(0, idx, sub)
    return out
