"""Per-step routing of full-module adapters: which tokens and logits rows use whose tables.

Built once per step from the sequences' resident copies (`FullModuleStore`) and read by the
embedding hook and the output head (`models.causal_lm`). A step without such adapters has
no batch at all (None), and the model runs exactly as for plain LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adapterhub_server.lora.full_module_store import ResidentFullModules
from adapterhub_server.models.transfer import to_device


@dataclass(frozen=True, eq=False)
class TableRows:
    """Rows that use one adapter's full table instead of the base module's."""

    rows: torch.Tensor
    """`[n]` int64: flat token positions (embedding) or logits rows (head)."""
    weight: torch.Tensor
    """`[vocab, hidden]`."""
    bias: torch.Tensor | None = None
    """`[vocab]` (head only)."""


@dataclass(frozen=True, eq=False)
class HeadTokenRows:
    """Logits rows of one adapter whose head has trained rows for some token ids."""

    rows: torch.Tensor
    """`[n]` int64 logits rows."""
    cols: torch.Tensor
    """`[k]` int64 token ids."""
    values: torch.Tensor
    """`[k, hidden]`: logits[rows, cols[j]] = x[rows] @ values[j]."""


@dataclass
class FullModuleBatch:
    """Semantics, for a flat batch of T tokens and S logits rows:

    * for each g in embed_tables, each t in g.rows: emb[t] = g.weight[ids[t]] (* the
      embedding's own scale, as the family's module applies it);
    * for each t in embed_rows: emb[embed_rows[t]] = embed_values[t] (* scale);
    * for each g in head_tables, each s in g.rows: logits[s] = x[s] @ g.weight.T + g.bias;
    * for each h in head_rows, each s in h.rows, each j: logits[s, h.cols[j]] = x[s] @ h.values[j].
    """

    embed_tables: list[TableRows] = field(default_factory=list)
    embed_rows: torch.Tensor | None = None
    """`[m]` int64 flat token positions whose embedding comes from a trained token row."""
    embed_values: torch.Tensor | None = None
    """`[m, hidden]` those rows."""
    head_tables: list[TableRows] = field(default_factory=list)
    head_rows: list[HeadTokenRows] = field(default_factory=list)

    @property
    def touches_embedding(self) -> bool:
        return bool(self.embed_tables) or self.embed_rows is not None

    @property
    def touches_head(self) -> bool:
        return bool(self.head_tables) or bool(self.head_rows)


@dataclass(frozen=True)
class Span:
    """One sequence's tokens in the step."""

    resident: ResidentFullModules | None
    start: int
    end: int
    """Flat token positions ``[start, end)``."""
    logits_row: int | None
    """Its row among the step's logits, if it samples this step."""


def build_full_module_batch(
    spans: Sequence[Span], ids: Sequence[int], device: torch.device
) -> FullModuleBatch | None:
    """The step's routing; None when no sequence's adapter has full modules or token rows."""
    groups: dict[int, tuple[ResidentFullModules, list[Span]]] = {}
    for span in spans:
        if span.resident is not None:
            groups.setdefault(id(span.resident), (span.resident, []))[1].append(span)
    if not groups:
        return None
    batch = FullModuleBatch()
    row_positions: list[int] = []
    row_values: list[torch.Tensor] = []
    for resident, members in groups.values():
        mods = resident.modules
        positions = [t for s in members for t in range(s.start, s.end)]
        logit_rows = [s.logits_row for s in members if s.logits_row is not None]
        if mods.embed_table is not None:
            batch.embed_tables.append(
                TableRows(to_device(positions, torch.long, device), mods.embed_table)
            )
        if mods.embed_tokens is not None:
            hits = [
                (t, resident.embed_index[ids[t]])
                for t in positions
                if ids[t] in resident.embed_index
            ]
            if hits:
                row_positions += [t for t, _ in hits]
                which = to_device([j for _, j in hits], torch.long, device)
                row_values.append(mods.embed_tokens.rows.index_select(0, which))
        if not logit_rows:
            continue
        rows = to_device(logit_rows, torch.long, device)
        if mods.head_weight is not None:
            batch.head_tables.append(TableRows(rows, mods.head_weight, mods.head_bias))
        if mods.head_tokens is not None:
            batch.head_rows.append(
                HeadTokenRows(rows, mods.head_tokens.indices, mods.head_tokens.rows)
            )
    if row_positions:
        batch.embed_rows = to_device(row_positions, torch.long, device)
        batch.embed_values = torch.cat(row_values)
    if not batch.touches_embedding and not batch.touches_head:
        return None
    return batch
