"""The choices of an `n > 1` request in the engine: later choices follow the first, so the
prompt's keys and values are computed once and its full blocks are shared."""

from __future__ import annotations

from pathlib import Path

from adapterhub_server.api.service import choice_params
from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.test_engine import Result, _drain
from tests.engine.test_paged_kv import BLOCK, SHARED, _engine


def _run_choices(engine, prompt: list[int], params: SamplingParams, n: int, adapter=None):
    engine.add_request("c0", prompt, choice_params(params, 0), adapter)
    for i in range(1, n):
        engine.add_request(f"c{i}", prompt, choice_params(params, i), adapter, follows="c0")
    results: dict[str, Result] = {}
    _drain(engine, results)
    return [results[f"c{i}"] for i in range(n)]


def test_followers_read_the_leaders_prompt_blocks(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    engine = _engine(tiny_base, {"r8": tiny_adapters["r8"]})
    prompt = [*SHARED, 5]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = _run_choices(engine, prompt, params, 4, "r8")
    # Greedy choices are equal, and every follower took all six full blocks from the cache.
    assert all(o.token_ids == outs[0].token_ids for o in outs)
    assert engine.kv.stats.hit_tokens == 3 * len(SHARED)
    assert len(SHARED) == 6 * BLOCK


def test_without_following_the_same_step_computes_the_prompt_again(tiny_base: Path) -> None:
    """The control: submitted together without `follows`, the copies prefill side by side
    and find nothing cached (what the follower rule avoids)."""
    engine = _engine(tiny_base)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"c{i}", [*SHARED, 5], params)
    _drain(engine, {})
    assert engine.kv.stats.hit_tokens == 0


def test_seeded_choices_are_reproducible_and_differ(tiny_base: Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    first = _run_choices(_engine(tiny_base), [*SHARED, 9], params, 3)
    again = _run_choices(_engine(tiny_base), [*SHARED, 9], params, 3)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) == 3
    # Choice 0 is the request's own seed: the same as an n=1 request with that seed.
    alone = _run_choices(_engine(tiny_base), [*SHARED, 9], params, 1)
    assert alone[0].token_ids == first[0].token_ids


def test_a_follower_of_a_finished_leader_is_admitted(tiny_base: Path) -> None:
    engine = _engine(tiny_base)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request("c0", [*SHARED, 5], params)
    engine.add_request("c1", [*SHARED, 5], params, follows="c0")
    engine.abort("c0")
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["c1"].finish_reason == "length"


def test_no_prefix_caching_ignores_following(tiny_base: Path) -> None:
    engine = _engine(tiny_base, prefix_caching=False)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    outs = _run_choices(engine, [*SHARED, 5], params, 3)
    assert all(o.token_ids == outs[0].token_ids for o in outs)
    assert engine.kv.stats.hit_tokens == 0
