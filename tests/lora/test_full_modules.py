"""Parsing and validating modules_to_save / trainable_token_indices (as PEFT 0.21 saves and
loads them), and the bounded device room for full-module copies."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import LoRAAdapter, adaptable_modules, load_adapter
from adapterhub_server.lora.full_module_store import FullModuleStore
from adapterhub_server.lora.full_modules import (
    EmbeddingTargets,
    FullModules,
    TokenRows,
    embedding_targets,
)
from tests.full_module_adapters import make_full_module_adapter
from tests.tiny_models import make_tiny_llama

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HEAD = "base_model.model.lm_head.weight"
EMBED = "base_model.model.model.embed_tokens.weight"
EMBED_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_ROWS = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"


def _base(path: Path, tied: bool) -> Path:
    return make_tiny_llama(path, tie_word_embeddings=tied, num_layers=1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("full-bases")
    return {tied: _base(root / f"tied-{tied}", tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def specs(bases: dict[bool, Path]):
    from transformers import AutoModelForCausalLM

    out = {}
    for tied, path in bases.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out[tied] = (adaptable_modules(model), embedding_targets(model), model)
    return out


def _load(path: Path, specs, tied: bool, **kwargs) -> LoRAAdapter:
    targets, embeddings, _ = specs[tied]
    return load_adapter(
        path, name="t", targets=targets, max_rank=64, embeddings=embeddings, **kwargs
    )


def _rejects(path: Path, specs, tied: bool, *fragments: str) -> str:
    with pytest.raises(AdapterValidationError) as info:
        _load(path, specs, tied)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def saved(bases: dict[bool, Path], tmp_path_factory: pytest.TempPathFactory):
    """One PEFT adapter per option, per base (untied / tied)."""
    root = tmp_path_factory.mktemp("full-adapters")
    kinds = {
        "head": {"modules_to_save": ["lm_head"]},
        "embed": {"modules_to_save": ["embed_tokens"]},
        "tokens": {"trainable_token_indices": [5, 17]},
        "tokens-dict": {"trainable_token_indices": {"embed_tokens": [5, 17], "lm_head": [3]}},
        "tied-ewt": {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
    }
    return {
        (tied, kind): make_full_module_adapter(
            base, root / f"{kind}-{tied}", seed=3, target_modules=("q_proj",), **options
        )
        for tied, base in bases.items()
        for kind, options in kinds.items()
    }


# --- what is served -----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_each_option_parses_to_what_peft_applies(saved, specs, tied: bool) -> None:
    """The rules checked against `PeftModel.from_pretrained` on both bases: a full copy
    replaces its module only (both, sharing one table, with ensure_weight_tying on a tied
    base); embedding token rows also replace the tied head's rows."""
    tensors = {k: load_file(saved[tied, k] / WEIGHTS) for k in ("head", "embed", "tokens")}
    head = _load(saved[tied, "head"], specs, tied).full_modules
    assert head is not None and head.embed_table is None
    assert torch.equal(head.head_weight, tensors["head"][HEAD])

    embed = _load(saved[tied, "embed"], specs, tied).full_modules
    assert embed is not None and embed.head_weight is None
    assert torch.equal(embed.embed_table, tensors["embed"][EMBED])

    tokens = _load(saved[tied, "tokens"], specs, tied).full_modules
    assert tokens is not None and not tokens.has_tables
    assert tokens.embed_tokens.indices.tolist() == [5, 17]
    assert torch.equal(tokens.embed_tokens.rows, tensors["tokens"][EMBED_ROWS])
    assert (tokens.head_tokens is tokens.embed_tokens) == tied

    split = _load(saved[tied, "tokens-dict"], specs, tied).full_modules
    assert split.embed_tokens.indices.tolist() == [5, 17]
    assert split.head_tokens.indices.tolist() == [3]

    ewt = _load(saved[tied, "tied-ewt"], specs, tied).full_modules
    assert ewt.embed_table is not None
    if tied:
        assert ewt.head_weight is ewt.embed_table  # one device copy for both
    else:
        assert ewt.head_weight is None  # ensure_weight_tying means nothing untied


def test_full_tables_are_kept_in_the_serving_dtype(saved, specs) -> None:
    full = _load(saved[False, "head"], specs, False, serving_dtype=torch.bfloat16).full_modules
    assert full.head_weight.dtype == torch.bfloat16


def test_plain_lora_adapter_has_no_full_modules(bases, specs, tmp_path: Path) -> None:
    from tests.tiny_models import make_peft_adapter

    plain = make_peft_adapter(bases[False], tmp_path / "plain", seed=1, target_modules=("q_proj",))
    assert _load(plain, specs, False).full_modules is None


def test_embedding_targets_of_the_tiny_models(specs) -> None:
    _, untied, _ = specs[False]
    _, tied, _ = specs[True]
    assert (untied.embed_path, untied.head_path) == ("model.embed_tokens", "lm_head")
    assert untied.embed_shape == untied.head_shape == (320, 64)
    assert not untied.tied and tied.tied and not untied.head_bias
    assert untied.full_bytes(2) == 2 * 320 * 64 * 2


# --- what is refused ----------------------------------------------------------------------


def test_refuses_other_modules_in_modules_to_save(saved, specs, tmp_path: Path) -> None:
    path = _copy(saved[False, "head"], tmp_path / "a")
    _edit_config(path, modules_to_save=["lm_head", "norm"])
    _rejects(path, specs, False, "modules_to_save entry 'norm' is not servable", "model.norm")
    _edit_config(path, modules_to_save=["q_proj"])
    _rejects(path, specs, False, "'q_proj'", "only the output head ('lm_head')")
    _edit_config(path, modules_to_save=["classifier"])
    _rejects(path, specs, False, "'classifier'", "matches no module")


def test_refuses_wrong_shapes(saved, specs, tmp_path: Path) -> None:
    path = _copy(saved[False, "head"], tmp_path / "head")
    _edit_tensors(path, lambda t: t.__setitem__(HEAD, t[HEAD][:300]))
    _rejects(
        path, specs, False, HEAD, "shape [300, 64]", "expected [320, 64]", "resized vocabulary"
    )

    path = _copy(saved[False, "embed"], tmp_path / "embed")
    _edit_tensors(path, lambda t: t.__setitem__(EMBED, torch.zeros(320, 32)))
    _rejects(path, specs, False, EMBED, "expected [320, 64]")

    path = _copy(saved[False, "tokens"], tmp_path / "tokens")
    _edit_tensors(path, lambda t: t.__setitem__(EMBED_ROWS, torch.zeros(3, 64)))
    _rejects(path, specs, False, EMBED_ROWS, "expected [2, 64]", "2 token ids")


@pytest.mark.parametrize(
    ("indices", "fragments"),
    [
        ([5, 320], ["[320] are out of range", "320 rows"]),
        ([-1, 5], ["[-1] are out of range"]),
        ([5, 5], ["[5] appear more than once"]),
        ([5, True], ["integers only"]),
        ({"embed_tokens": []}, ["non-empty list"]),
        ({"lm_head": [1], "head": [2]}, ["names 'lm_head' twice"]),
        ({"norm": [1]}, ["trainable_token_indices entry 'norm' is not servable"]),
        ("5,17", ["must be a list of token ids or an object"]),
    ],
)
def test_refuses_bad_token_indices(saved, specs, tmp_path: Path, indices, fragments) -> None:
    path = _copy(saved[False, "tokens"], tmp_path / "a")
    _edit_config(path, trainable_token_indices=indices)
    _rejects(path, specs, False, CONFIG, *fragments)


def test_refuses_missing_and_unexpected_tensors(saved, specs, tmp_path: Path) -> None:
    path = _copy(saved[False, "head"], tmp_path / "missing")
    _edit_tensors(path, lambda t: t.pop(HEAD))
    _rejects(path, specs, False, f"missing tensor {HEAD!r}", "PEFT would fail to load")

    # A full copy the config does not call for: PEFT would not load it.
    path = _copy(saved[False, "tokens"], tmp_path / "unexpected")
    _edit_tensors(path, lambda t: t.__setitem__(HEAD, torch.zeros(320, 64)))
    _rejects(path, specs, False, f"unexpected tensor {HEAD!r}", "do not call for it")


def test_refuses_non_finite_values(saved, specs, tmp_path: Path) -> None:
    path = _copy(saved[False, "embed"], tmp_path / "a")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[EMBED][3, 4] = float("nan")

    _edit_tensors(path, poison)
    _rejects(path, specs, False, EMBED, "non-finite")


def test_refuses_what_peft_refuses_or_cannot_run(saved, specs, tmp_path: Path) -> None:
    # One module both saved in full and given token rows.
    path = _copy(saved[False, "embed"], tmp_path / "both")
    _edit_config(path, trainable_token_indices=[5])
    _rejects(path, specs, False, "'model.embed_tokens' is both saved in full")
    # On a tied base, embedding token rows reach the head, which is saved in full.
    path = _copy(saved[True, "head"], tmp_path / "tied-head")
    _edit_config(path, trainable_token_indices=[5])
    _rejects(path, specs, True, "'lm_head' is both saved in full", "through weight tying")
    # Tied modules given different rows while weight tying is required.
    path = _copy(saved[True, "tokens-dict"], tmp_path / "ewt")
    _edit_config(path, ensure_weight_tying=True)
    _rejects(path, specs, True, "different token ids while ensure_weight_tying")


def test_refuses_tied_copies_that_differ(saved, specs, tmp_path: Path) -> None:
    path = _copy(saved[True, "tied-ewt"], tmp_path / "a")
    _edit_tensors(path, lambda t: t.__setitem__(HEAD, t[HEAD] + 1))
    _rejects(path, specs, True, f"{HEAD!r} differs from {EMBED}", "one table for both")


def test_refused_without_the_bases_embeddings(saved, specs) -> None:
    targets, _, _ = specs[False]
    with pytest.raises(AdapterValidationError, match="modules_to_save cannot be validated"):
        load_adapter(saved[False, "head"], name="t", targets=targets, max_rank=64)


# --- the device room ------------------------------------------------------------------------


def _full(tables: bool) -> FullModules:
    rows = TokenRows(indices=torch.tensor([1, 2]), rows=torch.randn(2, 4))
    if tables:
        return FullModules(head_weight=torch.randn(8, 4))
    return FullModules(embed_tokens=rows)


def test_store_evicts_idle_copies_lru_and_never_pinned_ones() -> None:
    store = FullModuleStore(2, device=torch.device("cpu"), dtype=torch.float32)
    assert store.acquire("a", _full(True)) and store.acquire("b", _full(True))
    assert not store.acquire("c", _full(True))  # both pinned: c waits
    store.release("a")
    store.release("b")
    assert store.pin_resident("a")  # a is now the most recently used
    store.release("a")
    assert store.acquire("c", _full(True))  # evicts b, the least recently used idle copy
    assert store.get("b") is None and store.get("a") is not None
    assert store.evictions == 1
    # Token rows take no room: they are resident beside two pinned copies.
    assert store.acquire("a", _full(True))
    assert store.acquire("t", _full(False))
    assert store.get("t").embed_index == {1: 0, 2: 1}
    assert not store.forget("t")  # pinned
    store.release("t")
    assert store.forget("t") and store.get("t") is None


def test_store_without_room_refuses_full_copies_but_not_token_rows() -> None:
    store = FullModuleStore(0, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(AdapterValidationError, match="--max-full-module-adapters 0"):
        store.acquire("a", _full(True))
    assert store.acquire("t", _full(False))


def test_shared_tables_stay_shared_on_the_device() -> None:
    table = torch.randn(8, 4)
    store = FullModuleStore(1, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert store.acquire("a", FullModules(embed_table=table, head_weight=table))
    resident = store.get("a").modules
    assert resident.embed_table is resident.head_weight
    assert resident.embed_table.dtype == torch.bfloat16


def test_embedding_targets_of_a_model_without_a_linear_head() -> None:
    class NoHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

        def get_output_embeddings(self) -> None:
            return None

    spec: EmbeddingTargets = embedding_targets(NoHead())
    assert spec.head_path is None and spec.embed_path == "embed" and not spec.tied


# --- the step's routing in the model ----------------------------------------------------------


def test_embedding_and_head_routing_equal_each_adapters_merged_modules() -> None:
    """The batched routing against its loop definition: each token's embedding and each
    row's logits from its adapter's module with the full copy or token rows merged in, as
    PEFT's wrappers compute them (a scaled embedding, as Gemma 3's, scales its rows too)."""
    from adapterhub_server.lora.full_module_batch import Span, build_full_module_batch
    from adapterhub_server.models.causal_lm import FrozenHead, FullModuleContext, _embedding_hook

    torch.manual_seed(0)
    vocab, hidden = 12, 6

    class ScaledEmbedding(torch.nn.Embedding):  # as Gemma 3's: the module scales its rows
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids) * self.embed_scale

    embed = ScaledEmbedding(vocab, hidden)
    embed.register_buffer("embed_scale", torch.tensor(2.5), persistent=False)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    table = torch.randn(vocab, hidden)
    rows = TokenRows(indices=torch.tensor([3, 7]), rows=torch.randn(2, hidden))
    kinds = {
        "table": FullModules(embed_table=table, head_weight=torch.randn(vocab, hidden)),
        "rows": FullModules(embed_tokens=rows, head_tokens=rows),
    }
    store = FullModuleStore(2, device=torch.device("cpu"), dtype=torch.float32)
    for key, full in kinds.items():
        assert store.acquire(key, full)
    ids = [3, 7, 1, 3, 5, 7, 7, 2]
    # (adapter, start, end, logits row): a prefill chunk, then single-token decodes.
    layout = [
        ("rows", 0, 3, 0),
        (None, 3, 4, 1),
        ("table", 4, 6, 2),
        ("rows", 6, 7, 3),
        (None, 7, 8, None),
    ]
    spans = [Span(store.get(a) if a else None, s, e, r) for a, s, e, r in layout]
    batch = build_full_module_batch(spans, ids, torch.device("cpu"))
    assert batch is not None

    context = FullModuleContext()
    embed.register_forward_hook(_embedding_hook(context), with_kwargs=True)
    frozen = FrozenHead(head, context)
    x = torch.randn(1, 4, hidden)
    with torch.no_grad():
        context.batch = batch
        got_emb = embed(torch.tensor([ids]))[0]
        got_logits = frozen(x)[0]
        context.batch = None
        assert torch.equal(embed(torch.tensor([ids]))[0], embed.weight[ids] * 2.5)

    def merged(adapter: str | None, base: torch.Tensor, which: str) -> torch.Tensor:
        if adapter is None:
            return base
        full = kinds[adapter]
        if which == "embed" and full.embed_table is not None:
            return full.embed_table
        if which == "head" and full.head_weight is not None:
            return full.head_weight
        token_rows = full.embed_tokens if which == "embed" else full.head_tokens
        if token_rows is None:
            return base
        return base.index_copy(0, token_rows.indices, token_rows.rows)

    for adapter, start, end, row in layout:
        for t in range(start, end):
            want = merged(adapter, embed.weight.detach(), "embed")[ids[t]] * 2.5
            torch.testing.assert_close(got_emb[t], want)
        if row is not None:
            want = x[0, row] @ merged(adapter, head.weight.detach(), "head").T
            torch.testing.assert_close(got_logits[row], want)
