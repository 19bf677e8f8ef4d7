"""The pool's DoRA rows: computed at write time from the base, freed with the slot, grown
by doubling, and refused (with nothing written) where the scale cannot be served."""

from __future__ import annotations

import pytest
import torch

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import LoRAAdapter, ModuleLoRA, TargetShape
from adapterhub_server.lora.dora import IDENTITY_ROW
from adapterhub_server.lora.pool import LoRAWeightPool, packed_groups
from adapterhub_server.lora.slots import SlotAllocator

IN, OUT = 16, 8
Q = "layers.0.attn.q_proj"
OPROJ = "layers.0.attn.o_proj"
TARGETS = {Q: TargetShape(IN, OUT), OPROJ: TargetShape(IN, OUT)}


def _pool(max_slots: int = 8, bias: bool = False) -> tuple[LoRAWeightPool, dict]:
    gen = torch.Generator().manual_seed(0)
    pool = LoRAWeightPool(packed_groups(TARGETS), max_slots=max_slots)
    bases = {}
    for key in TARGETS:
        weight = torch.randn(OUT, IN, generator=gen)
        b = torch.randn(OUT, generator=gen) if bias else None
        pool.attach_base(key, weight, b)
        bases[key] = (weight, b)
    return pool, bases


def _adapter(seed: int, *, dora: bool = True, magnitude_scale: float = 1.0) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for key in (Q, OPROJ):
        magnitude = None
        if dora:
            magnitude = (torch.rand(OUT, generator=gen) + 0.5) * magnitude_scale
        modules[key] = ModuleLoRA(
            a=torch.randn(4, IN, generator=gen),
            b=torch.randn(OUT, 4, generator=gen),
            scale=2.0,
            magnitude=magnitude,
        )
    return LoRAAdapter(name=f"a{seed}", modules=modules, rank=4, config={}, source="")


def test_scale_is_peft_formula_and_bias_term() -> None:
    pool, bases = _pool(bias=True)
    adapter = _adapter(1)
    pool.write((8, 0), adapter)
    row = pool.dora_rows[(8, 0)]
    assert row != IDENTITY_ROW
    for key, module in adapter.modules.items():
        weight, bias = bases[key]
        assert module.magnitude is not None
        g = module.magnitude / torch.linalg.norm(weight + module.scale * module.b @ module.a, dim=1)
        tables = pool.dora_tables(key)
        assert tables is not None and tables.shift is not None
        torch.testing.assert_close(tables.scale[row], g)
        torch.testing.assert_close(tables.shift[row], (1 - g) * bias)
        assert torch.equal(tables.scale[IDENTITY_ROW], torch.ones(OUT))
        assert torch.equal(tables.shift[IDENTITY_ROW], torch.zeros(OUT))


def test_plain_adapters_take_no_row_and_no_tables() -> None:
    pool, _ = _pool()
    before = pool.nbytes()
    pool.write((8, 0), _adapter(1, dora=False))
    assert pool.dora_rows == {}
    assert pool.dora_tables(Q) is None
    pool.write((8, 1), _adapter(2))
    # Two groups of OUT columns, (1 identity + 4) rows of float32, no bias: no shift table.
    assert pool.nbytes() - before > 0
    dora_bytes = sum(pool.dora_tables(k).scale.nbytes for k in TARGETS)  # type: ignore[union-attr]
    assert dora_bytes == 2 * 5 * OUT * 4


def test_rows_are_freed_with_their_slot_and_reused() -> None:
    pool, _ = _pool()
    slots = SlotAllocator(2, on_release=pool.release)
    first = slots.allocate("a", 8)
    assert first is not None
    pool.write(first.route, _adapter(1))
    second = slots.allocate("b", 8)
    assert second is not None
    pool.write(second.route, _adapter(2))
    assert sorted(pool.dora_rows.values()) == [1, 2]
    freed = pool.dora_rows[first.route]
    third = slots.allocate("c", 8)  # evicts "a" (LRU, unpinned)
    assert third is not None and third.evicted == ["a"]
    assert first.route not in pool.dora_rows
    pool.write(third.route, _adapter(3))
    assert pool.dora_rows[third.route] == freed
    assert slots.evict("b")
    assert second.route not in pool.dora_rows
    # A plain adapter written over a DoRA adapter's route frees its row too.
    pool.write(third.route, _adapter(4, dora=False))
    assert pool.dora_rows == {}


def test_tables_grow_by_doubling_and_keep_rows() -> None:
    pool, _ = _pool(max_slots=16)
    pool.write((8, 0), _adapter(1))
    version = pool.version
    kept = pool.dora_tables(Q).scale[1].clone()  # type: ignore[union-attr]
    for slot in range(1, 6):
        pool.write((8, slot), _adapter(slot + 1))
    tables = pool.dora_tables(Q)
    assert tables is not None and tables.scale.shape[0] == 10  # 1 + 4, then doubled
    assert pool.version > version  # captured graphs must be dropped
    assert torch.equal(tables.scale[1], kept)
    assert len(set(pool.dora_rows.values())) == 6


def test_zero_norm_row_is_refused_and_nothing_written() -> None:
    pool, bases = _pool()
    adapter = _adapter(1)
    weight, _ = bases[Q]
    weight[3].zero_()
    adapter.modules[Q].b[3].zero_()
    with pytest.raises(AdapterValidationError, match=r"q_proj.*DoRA.*not finite at output row 3"):
        pool.write((8, 0), adapter)
    assert pool.dora_rows == {}
    assert pool.dora_tables(Q) is None
    assert pool.rank_classes() == []  # not even the slot tensors were touched


def test_scale_beyond_the_dtype_bound_is_refused() -> None:
    pool, _ = _pool()
    with pytest.raises(AdapterValidationError, match=r"DoRA magnitude .* above the bound"):
        pool.write((8, 0), _adapter(1, magnitude_scale=1e9))
    assert pool.dora_rows == {}


def test_rewriting_an_adapter_reuses_its_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evicted and written again (slot churn), the adapter's g is not recomputed."""
    import adapterhub_server.lora.pool as pool_module

    calls = []
    real = pool_module.column_scale

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool_module, "column_scale", counting)
    pool, _ = _pool()
    adapter = _adapter(1)
    pool.write((8, 0), adapter)
    first = pool.dora_tables(Q).scale[pool.dora_rows[(8, 0)]].clone()  # type: ignore[union-attr]
    pool.release((8, 0))
    pool.write((8, 1), adapter)
    assert len(calls) == 2  # one per DoRA module, once
    torch.testing.assert_close(pool.dora_tables(Q).scale[pool.dora_rows[(8, 1)]], first)  # type: ignore[union-attr]
