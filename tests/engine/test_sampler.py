"""Tests for the batched per-request sampler."""

from __future__ import annotations

import math

import pytest
import torch

from adapterhub_server.engine.logits_processors import SamplingContext
from adapterhub_server.engine.sampler import NON_FINITE, Sampler, SamplerOutput, make_generator
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import TokenMasks

VOCAB = 500


def _logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * 3.0


def _run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
) -> SamplerOutput:
    if generators is None:
        generators = [None] * len(params)
    return Sampler()(logits, params, generators)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = _logits(8).to(dtype)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


@pytest.mark.parametrize("with_random_row", [False, True])
def test_greedy_ties_pick_lowest_index(with_random_row: bool) -> None:
    """The lowest of equal maxima, in an all-greedy batch and beside a sampled row (the
    two paths take the maximum differently)."""
    logits = torch.zeros(3, 10)
    logits[0, [3, 7]] = 5.0
    logits[1, [2, 9]] = 1.0
    last = SamplingParams(temperature=1.0, seed=3) if with_random_row else SamplingParams()
    params = [SamplingParams(temperature=0.0)] * 2 + [last]
    out = _run(logits, params, [None, None, make_generator(last.seed)])
    assert out.token_ids[:2].tolist() == [3, 2]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    logits = _logits(16, seed=1)
    logits[0, [5, 11]] = logits[0].max() + 1.0  # a tie: must resolve like argmax
    out = _run(logits, [SamplingParams(temperature=temperature, top_k=1)] * 16)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_tiny_top_p_equals_greedy(temperature: float) -> None:
    logits = _logits(16, seed=2)
    logits[3, [0, 4]] = logits[3].max() + 1.0
    out = _run(logits, [SamplingParams(temperature=temperature, top_p=1e-6)] * 16)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_filtered_tokens_are_never_sampled() -> None:
    logits = _logits(4, vocab=50, seed=3).repeat(250, 1)  # 1000 draws, 4 distinct rows
    logits[:, 7] = float("-inf")  # a masked-out vocabulary entry
    params = [SamplingParams(temperature=2.0, top_k=5)] * 1000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = _run(logits, params)
    allowed = logits.topk(5, dim=-1).indices
    assert (out.token_ids.unsqueeze(1) == allowed).any(dim=1).all()
    # A high temperature with top_k=5 should actually spread over several tokens.
    assert len(set(out.token_ids[::4].tolist())) > 1


def _request_logits(request: int, step: int, vocab: int = VOCAB) -> torch.Tensor:
    """What the model would give request `request` at step `step` (independent of batch)."""
    gen = torch.Generator().manual_seed(1000 * request + step)
    return torch.randn(vocab, generator=gen) * 2.0


def _simulate(
    requests: dict[int, SamplingParams], schedule: list[list[int]]
) -> dict[int, list[int]]:
    """Run the sampler once per step over the requests listed for that step (in that row
    order), keeping one generator per request for its whole life, as the engine does."""
    sampler = Sampler()
    generators = {r: make_generator(p.seed) for r, p in requests.items()}
    steps = dict.fromkeys(requests, 0)
    tokens: dict[int, list[int]] = {r: [] for r in requests}
    for rows in schedule:
        logits = torch.stack([_request_logits(r, steps[r]) for r in rows])
        out = sampler(logits, [requests[r] for r in rows], [generators[r] for r in rows])
        for row, r in enumerate(rows):
            tokens[r].append(int(out.token_ids[row]))
            steps[r] += 1
    return tokens


def test_seeded_request_is_independent_of_batch_composition_and_row() -> None:
    seeded = {
        0: SamplingParams(temperature=1.0, seed=1234),
        1: SamplingParams(temperature=0.7, top_p=0.9, seed=99),
        2: SamplingParams(temperature=1.3, top_k=20, seed=5),
        3: SamplingParams(temperature=1.0, top_k=50, top_p=0.8, seed=2**62),
    }
    others = {
        10: SamplingParams(temperature=1.0),
        11: SamplingParams(temperature=0.0),
        12: SamplingParams(temperature=0.5, top_k=3, logprobs=2),
        13: SamplingParams(temperature=1.9, top_p=0.5),
    }
    steps = 12
    alone = {r: _simulate({r: p}, [[r]] * steps)[r] for r, p in seeded.items()}

    # Each step a different subset of other rows, in a shuffled order with the seeded rows.
    order = torch.Generator().manual_seed(7)
    schedule = []
    for step in range(steps):
        present = [r for r in others if (step + r) % 3 != 0] + list(seeded)
        perm = torch.randperm(len(present), generator=order).tolist()
        schedule.append([present[i] for i in perm])
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the unseeded rows' shared draw must not matter
        mixed = _simulate({**seeded, **others}, schedule)

    for r in seeded:
        assert mixed[r] == alone[r], f"request {r} changed with batch composition"
    # Sanity: the seeds really drive randomness (not every request collapsed to greedy).
    greedy = [int(_request_logits(0, s).argmax()) for s in range(steps)]
    assert alone[0] != greedy
    reseeded = _simulate({0: SamplingParams(temperature=1.0, seed=4321)}, [[0]] * steps)[0]
    assert reseeded != alone[0]


def test_same_seed_reproduces_across_calls() -> None:
    logits = _logits(1, seed=4)
    params = [SamplingParams(temperature=1.0, seed=42)]
    gen_a, gen_b = make_generator(42), make_generator(42)
    seq_a = [int(_run(logits, params, [gen_a]).token_ids) for _ in range(20)]
    seq_b = [int(_run(logits, params, [gen_b]).token_ids) for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(3), make_generator(3)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


BASE_PROBS = torch.tensor([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=1.0), BASE_PROBS),
        # Temperature 0.5 squares the probabilities before renormalising.
        (SamplingParams(temperature=0.5), BASE_PROBS**2 / (BASE_PROBS**2).sum()),
        (SamplingParams(temperature=2.0), BASE_PROBS.sqrt() / BASE_PROBS.sqrt().sum()),
        (SamplingParams(temperature=1.0, top_k=2), torch.tensor([0.0, 0.375, 0.625])),
        # Sorted 0.5, 0.3, 0.2: token 0.3 is kept (0.5 before it < 0.7), 0.2 is not (0.8).
        (SamplingParams(temperature=1.0, top_p=0.7), torch.tensor([0.0, 0.375, 0.625])),
        (SamplingParams(temperature=1.0, top_p=0.4), torch.tensor([0.0, 0.0, 1.0])),
    ],
)
@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_distribution(
    params: SamplingParams, expected: torch.Tensor, seeded: bool
) -> None:
    draws = 3000
    logits = BASE_PROBS.log().repeat(draws, 1)
    if seeded:
        generators = [make_generator(10_000 + i) for i in range(draws)]
        out = _run(logits, [params] * draws, generators)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = _run(logits, [params] * draws)
    counts = torch.bincount(out.token_ids, minlength=3).float()
    # 2 degrees of freedom: chi2 > 25 has probability ~4e-6; the draw is seeded anyway.
    assert _chi_square(counts, expected) < 25.0, counts


def test_logprobs_are_raw_log_softmax_at_chosen_ids() -> None:
    logits = _logits(6, seed=5)
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.5, logprobs=3),
        SamplingParams(temperature=1.5, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5, logprobs=5, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, logprobs=1),
    ]
    generators = [make_generator(p.seed) for p in params]
    out = _run(logits, params, generators)
    expected_all = torch.log_softmax(logits, dim=-1)  # temperature-free, like OpenAI
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, expected_all.gather(1, out.token_ids[:, None])[:, 0])

    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (6, 5) and out.top_logprobs.shape == (6, 5)
    assert out.top_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    ref_vals, ref_ids = expected_all.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ref_ids)
    assert torch.allclose(out.top_logprobs, ref_vals)
    assert torch.allclose(out.top_logprobs, expected_all.gather(1, out.top_ids))
    # A greedy row's chosen token is its top-1 alternative.
    assert out.token_ids[0] == out.top_ids[0, 0]


def test_logprobs_zero_gives_no_top_lists() -> None:
    logits = _logits(2, seed=6).half()
    out = _run(logits, [SamplingParams(temperature=0.0, logprobs=0), SamplingParams()])
    assert out.logprobs is not None and out.top_ids is None and out.top_logprobs is None
    ref = torch.log_softmax(logits.float(), dim=-1)[0, out.token_ids[0]]
    assert math.isclose(float(out.logprobs[0]), float(ref), rel_tol=1e-6)


def test_mixed_batch_greedy_random_seeded() -> None:
    logits = _logits(6, seed=8)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.6, seed=12),
        SamplingParams(temperature=1.0),
    ]
    generators = [make_generator(p.seed) for p in params]
    out = _run(logits, params, generators)

    greedy = logits.argmax(dim=-1)
    assert out.token_ids[0] == greedy[0] and out.token_ids[3] == greedy[3]
    assert int(out.token_ids[2]) in logits[2].topk(4).indices.tolist()
    for row in (1, 4):
        solo = _run(logits[row : row + 1], [params[row]], [make_generator(params[row].seed)])
        assert out.token_ids[row] == solo.token_ids[0]
    assert out.top_ids is not None and out.top_ids.shape == (6, 2)


def test_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        Sampler()(_logits(2), [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(4), [SamplingParams()], [None])


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 9.9e-6])
def test_temperature_near_zero_is_greedy(temperature: float) -> None:
    """Found by probing: dividing logits by a denormal temperature overflowed to NaN
    probabilities and an empty answer; the limit of sampling as T -> 0 is the argmax."""
    logits = _logits(16, seed=5) * 1e3
    params = [SamplingParams(temperature=temperature, top_k=50, top_p=0.9)] * 16
    out = _run(logits, params)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45])
def test_top_p_that_rounds_to_zero_is_greedy(top_p: float) -> None:
    """A top_p below float32's smallest value used to remove every token (NaN, then an
    arbitrary id); the most likely token always survives."""
    logits = _logits(16, seed=6)
    out = _run(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 16)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_small_temperature_over_huge_logits_stays_finite() -> None:
    """Finite logits divided by a small (non-greedy) temperature can pass float32's range."""
    logits = _logits(4, seed=7) * 1e36
    out = _run(logits, [SamplingParams(temperature=1e-4)] * 4)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rows_without_a_finite_maximum_are_marked(temperature: float) -> None:
    """NaN or +inf anywhere, or every entry -inf: the row gets NON_FINITE; the other rows,
    including one with a single -inf (a mask), are sampled as usual."""
    logits = _logits(5, seed=8)
    logits[0, 3] = float("nan")
    logits[1, 9] = float("inf")
    logits[2] = float("-inf")
    logits[4, 0] = float("-inf")
    params = [SamplingParams(temperature=temperature, seed=1, logprobs=2)] * 5
    out = _run(logits, params, generators=[make_generator(1) for _ in range(5)])
    assert out.token_ids[:3].tolist() == [NON_FINITE] * 3
    assert out.token_ids[3:].tolist() == [
        _run(logits[i : i + 1], params[:1], generators=[make_generator(1)]).token_ids.item()
        for i in (3, 4)
    ]
    assert all(0 <= t < logits.shape[1] for t in out.token_ids[3:].tolist())


# -- grammar masks (structured outputs) ----------------------------------------------------


def _masks(allowed: dict[int, list[int]], vocab: int = VOCAB) -> TokenMasks:
    """Masks that allow, in each listed row, only the listed tokens."""
    rows = sorted(allowed)
    bias = torch.full((len(rows), vocab), float("-inf"))
    for r, row in enumerate(rows):
        bias[r, allowed[row]] = 0.0
    return TokenMasks(torch.tensor(rows), bias)


def test_masked_rows_choose_only_allowed_tokens_and_free_rows_are_untouched() -> None:
    """Greedy, random and seeded rows, constrained and free, in one batch: constrained rows
    pick only allowed tokens; free rows' tokens and logprobs are bit-identical to a batch
    without masks (their seeded streams advance the same)."""
    logits = _logits(6, seed=7)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.9, seed=1, logprobs=2),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.3, seed=2, top_p=0.9, logprobs=2),
        SamplingParams(temperature=0.7, seed=3, top_k=20, logprobs=2),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    allowed = {1: [3, 250, 499], 2: [10, 11], 4: [42]}

    def run(masks: TokenMasks | None) -> SamplerOutput:
        gens = [make_generator(p.seed) for p in params]
        return Sampler()(logits.clone(), params, gens, None, masks)

    free, masked = run(None), run(_masks(allowed))
    for row, tokens in allowed.items():
        assert masked.token_ids[row].item() in tokens
    for row in (0, 3, 5):
        assert masked.token_ids[row] == free.token_ids[row]
        assert torch.equal(masked.logprobs[row], free.logprobs[row])
        assert torch.equal(masked.top_ids[row], free.top_ids[row])
    # The masked greedy row picks the best allowed token; logprobs stay the raw ones.
    assert masked.token_ids[2].item() == max(allowed[2], key=lambda t: logits[2, t].item())
    assert masked.logprobs[2].item() == pytest.approx(
        torch.log_softmax(logits[2], -1)[masked.token_ids[2]].item()
    )


def test_mask_wins_over_logit_bias_and_penalties() -> None:
    logits = _logits(2, seed=8)
    forbidden = int(logits[0].argmin())
    params = [
        SamplingParams(temperature=0.0, logit_bias=((forbidden, 100.0),), repetition_penalty=1.5),
        SamplingParams(temperature=0.0, logit_bias=((forbidden, 100.0),)),
    ]
    contexts = [SamplingContext([forbidden, 5], [], frozenset())] * 2
    out = Sampler()(logits, params, [None, None], contexts, _masks({0: [5, 6]}))
    assert out.token_ids[0].item() in (5, 6)
    assert out.token_ids[1].item() == forbidden  # the free row still gets its bias


def test_non_finite_raw_row_is_marked_when_a_mask_hides_it() -> None:
    """A NaN logit marks its row even where a grammar mask excludes that token (all-greedy
    batch and mixed batch: the two paths take the row maxima differently)."""
    logits = _logits(3, seed=5)
    logits[0, 4] = float("nan")
    for last in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=2)):
        params = [SamplingParams(temperature=0.0)] * 2 + [last]
        gens = [None, None, make_generator(last.seed)]
        out = Sampler()(logits.clone(), params, gens, None, _masks({0: [5, 6], 1: [5, 6]}))
        assert out.token_ids[0].item() == NON_FINITE
        assert out.token_ids[1].item() in (5, 6)


def test_grammar_wins_when_min_tokens_removes_its_only_choice() -> None:
    """min_tokens forbids the stop token the grammar requires: the grammar's choice stands
    (without the fallback the row would have no finite logit and fail as NON_FINITE)."""
    logits = _logits(1, seed=9)
    params = [SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=(7,))]
    contexts = [SamplingContext([1, 2], [3], frozenset({7}))]
    out = Sampler()(logits, params, [None], contexts, _masks({0: [7]}))
    assert out.token_ids.tolist() == [7]
