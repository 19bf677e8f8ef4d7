"""A step whose logits go non-finite fails that request with a clear error, not an empty or
arbitrary answer, and the rest of the batch comes out unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_server.engine.engine import NON_FINITE_LOGITS
from tests.engine.test_engine import _engine
from tests.engine.test_failure_isolation import _error_codes, _requests, _run


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_logits_fail_only_their_request(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, poison: float
) -> None:
    clean_engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(clean_engine)
    clean = _run(clean_engine, reqs)

    engine = _engine(tiny_base, tiny_adapters)
    # The poisoned request's prompt ends in a token no other prompt ends in: its logits row
    # (the one sampled from that last prompt token, at prefill) is overwritten.
    victim_id, victim_prompt, _ = reqs[2]
    marker = victim_prompt[-1]
    assert all(ids[-1] != marker for rid, ids, _ in reqs if rid != victim_id)
    real = engine.model.forward

    def forward(input_ids, positions, attn, cache, lora, logits_index, *rest):
        logits = real(input_ids, positions, attn, cache, lora, logits_index, *rest).clone()
        hit = input_ids[logits_index] == marker
        hit[: attn.num_decode] = False  # prefill rows only: decodes may emit the marker
        logits[hit.nonzero().flatten(), 5] = poison
        return logits

    monkeypatch.setattr(engine.model, "forward", forward)
    results = _run(engine, reqs)

    assert _error_codes(results) == {victim_id: NON_FINITE_LOGITS}
    failed = results[victim_id]
    assert "overflowed" in (failed.error or "")
    for rid, _, _ in reqs:
        if rid != victim_id:
            assert results[rid].token_ids == clean[rid].token_ids, rid
    assert engine.num_running == 0 and not engine.has_work()
