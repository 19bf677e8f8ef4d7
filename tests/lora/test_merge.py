"""Per-request merges against PEFT's add_weighted_adapter (the oracle), on tiny random models.

Every strategy is served in one batch with plain LoRA adapters and base rows; greedy output
must equal PEFT generating with the adapter `add_weighted_adapter` builds from the same
components, weights and density (for DARE, with the masks the server drew injected into
PEFT's random pruning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import AdapterNotFoundError, InvalidRequestError
from adapterhub_server.lora.merge import MergeError, MergeSpec, dare_mask
from tests.engine.conftest import greedy_continuation
from tests.engine.test_engine import PROMPTS, Result, _drain, _engine
from tests.tiny_models import make_peft_adapter


@pytest.fixture(scope="module")
def merge_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    specs = {
        "a8": {"r": 8, "alpha": 16},
        "b8": {"r": 8, "alpha": 8, "target_modules": ("q_proj", "v_proj", "o_proj", "up_proj")},
        "c4": {"r": 4, "alpha": 8},
        "rx": {"r": 8, "alpha": 8, "target_modules": ("q_proj", "v_proj")},
    }
    out = {
        name: make_peft_adapter(tiny_base, root / name, seed=40 + i, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }
    # A regex target_modules: PEFT refuses to combine it with a list.
    import json

    config_path = out["rx"] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = r".*\.(q_proj|v_proj)"
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def plain_greedy(tiny_base: Path, tiny_adapters, merge_adapters):
    """Greedy continuation by HF (base) or PEFT (one plain adapter), alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = {**tiny_adapters, **merge_adapters}
    models: dict[str | None, torch.nn.Module] = {}

    def run(adapter: str | None, ids: list[int], n: int) -> list[int]:
        if adapter not in models:
            model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, paths[adapter])
            models[adapter] = model.eval()
        return greedy_continuation(models[adapter], ids, n)

    return run


@contextmanager
def _injected_dare_masks(model, names: list[str], seed_key: str) -> Iterator[None]:
    """Make PEFT's DARE draw exactly the masks the server drew (`dare_mask`)."""
    import peft.utils.merge_utils as merge_utils
    from peft.tuners.lora import LoraLayer

    where: dict[int, tuple[str, str, int]] = {}
    for module_name, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for index, name in enumerate(names):
            if name in module.lora_A:
                where[module.lora_A[name].weight.data_ptr()] = (module_name, "A", index)
                where[module.lora_B[name].weight.data_ptr()] = (module_name, "B", index)
    original = merge_utils.random_pruning

    def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        module_name, factor, index = where[tensor.data_ptr()]
        mask = dare_mask(seed_key, module_name, factor, index, tensor.shape, density)
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    merge_utils.random_pruning = random_pruning
    try:
        yield
    finally:
        merge_utils.random_pruning = original


def _peft_merged_greedy(
    base: Path,
    adapters: dict[str, Path],
    spec: MergeSpec,
    prompts: list[list[int]],
    max_new: int,
    seed_key: str | None = None,
) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(spec.ids)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    kwargs = {"density": spec.density, "majority_sign_method": spec.majority_sign_method}
    if spec.strategy.startswith("dare"):
        assert seed_key is not None
        with _injected_dare_masks(model, names, seed_key):
            model.add_weighted_adapter(
                names, list(spec.weights), "merged", combination_type=spec.strategy, **kwargs
            )
    else:
        model.add_weighted_adapter(
            names, list(spec.weights), "merged", combination_type=spec.strategy, **kwargs
        )
    model.set_adapter("merged")
    model.eval()
    return [greedy_continuation(model, ids, max_new) for ids in prompts]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


SPECS = [
    MergeSpec(ids=("a8", "c4", "b8"), weights=(0.7, -0.4, 1.3), strategy="cat"),
    MergeSpec(ids=("a8", "b8"), weights=(0.6, 0.9), strategy="linear"),
    MergeSpec(ids=("a8", "b8"), weights=(1.0, 0.5), strategy="ties", density=0.5),
    MergeSpec(
        ids=("a8", "b8"),
        weights=(0.8, 0.8),
        strategy="ties",
        density=0.7,
        majority_sign_method="frequency",
    ),
    MergeSpec(ids=("a8", "b8"), weights=(0.9, 0.6), strategy="dare_linear", density=0.5),
    MergeSpec(ids=("a8", "b8"), weights=(1.0, 1.0), strategy="dare_ties", density=0.6),
    # PEFT keeps the first component's use_rslora: the merged scale is sqrt(new rank).
    MergeSpec(ids=("r16-rslora", "c4"), weights=(0.5, 1.0), strategy="cat"),
    # One component: PEFT merges it linearly whatever the strategy (no pruning).
    MergeSpec(ids=("a8",), weights=(-0.8,), strategy="ties", density=0.3),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.strategy}-{s.majority_sign_method}-{len(s.ids)}-{s.ids[0]}"
)
def test_merge_in_a_mixed_batch_equals_peft(
    tiny_base, tiny_adapters, merge_adapters, plain_greedy, spec: MergeSpec
) -> None:
    """Two merged requests, plain adapters and base rows decoded together in one batch."""
    engine = _engine(tiny_base, {**tiny_adapters, **merge_adapters}, max_loras=4)
    tok = engine.tokenizer
    n = 8
    plain: list[tuple[str, list[int], str | None]] = [
        ("plain-r4", tok.encode(PROMPTS[1]), "r4"),
        ("base", tok.encode(PROMPTS[2]), None),
        ("plain-a8", tok.encode(PROMPTS[3]), "a8"),
    ]
    merged_prompts = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[5])]
    engine.add_request("merged-0", merged_prompts[0], _greedy(n), spec)
    for rid, ids, adapter in plain:
        engine.add_request(rid, ids, _greedy(n), adapter)
    engine.add_request("merged-1", merged_prompts[1], _greedy(n), spec)
    seed_key = None
    results: dict[str, Result] = {}
    _drain(engine, results)
    loc = engine.adapters.locate(spec)
    seed_key = engine.adapters.content_identity(loc.key)
    expected = _peft_merged_greedy(
        tiny_base, {**tiny_adapters, **merge_adapters}, spec, merged_prompts, n, seed_key
    )
    assert [results[f"merged-{i}"].token_ids for i in range(2)] == expected
    for rid, ids, adapter in plain:
        assert results[rid].token_ids == plain_greedy(adapter, ids, n), rid
    # The merge changes the output: it is not silently served as the base or one component.
    assert expected[0] != plain_greedy(None, merged_prompts[0], n) or expected[1] != (
        plain_greedy(None, merged_prompts[1], n)
    )


def test_same_merge_twice_is_computed_once_and_gives_the_same_tokens(
    tiny_base, merge_adapters
) -> None:
    spec = MergeSpec(ids=("a8", "b8"), weights=(1.0, 0.7), strategy="dare_ties", density=0.5)
    engine = _engine(tiny_base, merge_adapters)
    ids = engine.tokenizer.encode(PROMPTS[4])
    outputs = []
    merged_logs = []
    for attempt in range(2):
        engine.add_request(f"r{attempt}", ids, _greedy(10), spec)
        results: dict[str, Result] = {}
        _drain(engine, results)
        outputs.append(results[f"r{attempt}"].token_ids)
        merged_logs.append(engine.adapters.stats())
    assert outputs[0] == outputs[1]
    # The merge was written into a slot once; the second request found it there.
    assert merged_logs[1].device_writes == merged_logs[0].device_writes == 1
    assert merged_logs[1].hits == merged_logs[0].hits + 1
    assert merged_logs[1].loads == merged_logs[0].loads
    assert engine.adapters.rank_of(engine.adapters.locate(spec).key) == 8
    # A fresh engine (a restart) draws the same DARE masks: same tokens again.
    again = _engine(tiny_base, merge_adapters)
    again.add_request("r", ids, _greedy(10), spec)
    results = {}
    _drain(again, results)
    assert results["r"].token_ids == outputs[0]


def test_merge_identity_differs_from_its_components_and_other_weights(
    tiny_base, merge_adapters
) -> None:
    engine = _engine(tiny_base, merge_adapters)
    one = MergeSpec(ids=("a8", "b8"), weights=(1.0, 0.5), strategy="linear")
    other = MergeSpec(ids=("a8", "b8"), weights=(1.0, 0.25), strategy="linear")
    ids = engine.tokenizer.encode(PROMPTS[0])
    for rid, adapter in (("m1", one), ("m2", other), ("a", "a8")):
        engine.add_request(rid, ids, _greedy(3), adapter)
    _drain(engine, {})
    identities = {
        engine.adapters.content_identity(engine.adapters.locate(x).key) for x in (one, other, "a8")
    }
    assert len(identities) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (MergeSpec(ids=("a8", "c4"), weights=(1, 1), strategy="linear"), "same rank"),
        (MergeSpec(ids=("a8", "rx"), weights=(1, 1), strategy="cat"), "regex"),
        (
            MergeSpec(ids=("a8", "c4", "b8", "rx"), weights=(1, 1, 1, 1), strategy="cat"),
            "regex",
        ),
    ],
)
def test_peft_refusals_fail_the_request_only(tiny_base, merge_adapters, spec, message) -> None:
    engine = _engine(tiny_base, merge_adapters)
    ids = engine.tokenizer.encode(PROMPTS[0])
    engine.add_request("bad", ids, _greedy(4), spec)
    engine.add_request("good", ids, _greedy(4), "a8")
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["bad"].finish_reason == "error"
    assert message in (results["bad"].error or "")
    assert len(results["good"].token_ids) == 4


def test_merged_rank_over_the_limit_is_refused(tiny_base, merge_adapters) -> None:
    engine = _engine(tiny_base, merge_adapters, max_lora_rank=16)
    spec = MergeSpec(ids=("a8", "c4", "b8"), weights=(1, 1, 1), strategy="cat")
    engine.add_request("bad", engine.tokenizer.encode("abc"), _greedy(2), spec)
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["bad"].finish_reason == "error"
    assert "--max-lora-rank=16" in (results["bad"].error or "")
    assert "rank 20" in (results["bad"].error or "")


def test_unknown_component_is_not_found_before_queueing(tiny_base, merge_adapters) -> None:
    engine = _engine(tiny_base, merge_adapters)
    spec = MergeSpec(ids=("a8", "nope"), weights=(1, 1))
    with pytest.raises(AdapterNotFoundError, match="nope"):
        engine.add_request("x", [1, 2], _greedy(2), spec)
    assert engine.num_waiting == 0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"ids": (), "weights": ()}, "merged_adapters.ids"),
        ({"ids": tuple(f"a{i}" for i in range(9)), "weights": (1,) * 9}, "merged_adapters.ids"),
        ({"ids": ("a", "b"), "weights": (1,)}, "merged_adapters.weights"),
        ({"ids": ("a", "b"), "weights": (1, float("nan"))}, "merged_adapters.weights"),
        (
            {"ids": ("a", "b"), "weights": (1, 1), "strategy": "svd"},
            "merged_adapters.merge_strategy",
        ),
        ({"ids": ("a", "b"), "weights": (1, 1), "strategy": "ties"}, "merged_adapters.density"),
        ({"ids": ("a", "b"), "weights": (1, 1), "density": 0.0}, "merged_adapters.density"),
        ({"ids": ("a", "b"), "weights": (1, 1), "density": 1.5}, "merged_adapters.density"),
        ({"ids": ("a", "a"), "weights": (1, 1)}, "merged_adapters.ids"),
        (
            {"ids": ("a", "b"), "weights": (1, 1), "majority_sign_method": "x"},
            "merged_adapters.majority_sign_method",
        ),
    ],
)
def test_spec_validation(kwargs, param) -> None:
    with pytest.raises(InvalidRequestError) as info:
        MergeSpec(**kwargs)
    assert info.value.param == param


def test_merging_dora_is_refused(tiny_base, merge_adapters, tmp_path) -> None:
    import json
    import shutil

    from adapterhub_server.lora.merge import merge_adapters as merge

    dora = tmp_path / "dora"
    shutil.copytree(merge_adapters["b8"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True

    class _Fake:
        pass

    fake = _Fake()
    fake.config = config  # type: ignore[attr-defined]
    with pytest.raises(MergeError, match="use_dora"):
        merge(
            [fake, fake],
            MergeSpec(ids=("x", "y"), weights=(1, 1)),
            name="m",
            seed_key="k",
            max_rank=64,
        )  # type: ignore[list-item]


def test_merges_are_computed_off_the_engine_thread_on_one_torch_thread(
    tiny_base, merge_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader thread computes a merge with torch on one thread: with more, it would
    start an OpenMP team of its own, which slows every later decode step
    (`adapterhub_server.torch_threads`); the engine's thread keeps its count."""
    import threading

    from adapterhub_server.lora import cache

    seen: list[tuple[str, int]] = []
    merge = cache.merge_adapters

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return merge(*args, **kwargs)

    monkeypatch.setattr(cache, "merge_adapters", recording)
    engine = _engine(tiny_base, merge_adapters)
    threads = torch.get_num_threads()
    spec = MergeSpec(ids=("a8", "c4"), weights=(0.5, 0.5), strategy="cat")
    engine.add_request("m", engine.tokenizer.encode(PROMPTS[1]), _greedy(4), spec)
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert len(results["m"].token_ids) == 4
    assert seen == [("adapter-load_0", 1)]
    assert torch.get_num_threads() == threads


def test_adapters_read_on_a_server_worker_thread_use_one_torch_thread(
    tiny_base, merge_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/v1/load_lora_adapter` reads the files on a worker thread (`load_adapter_now`):
    the same one-thread rule as the loader thread's."""
    import threading

    from adapterhub_server.lora import cache

    engine = _engine(tiny_base, merge_adapters)
    seen: list[int] = []
    load = cache.load_adapter

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return load(*args, **kwargs)

    monkeypatch.setattr(cache, "load_adapter", recording)
    threads = torch.get_num_threads()
    worker = threading.Thread(target=engine.load_adapter_now, args=(engine.adapters.locate("a8"),))
    worker.start()
    worker.join()
    assert seen == [1]
    assert torch.get_num_threads() == threads
