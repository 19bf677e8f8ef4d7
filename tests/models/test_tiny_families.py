"""The tiny family checkpoints load, generate, take PEFT adapters, and route attention
through transformers' attention interface.

The interface tests pin what a generic model layer relies on: every layer calls the
registered function, with no mask built for it, and the kwargs it receives
(`sliding_window`, `softcap`, `scaling`) plus per-sequence positions are enough to
reproduce transformers' own logits, packed sequences included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_families import (
    ATTENTION_PROJECTIONS,
    DEFAULT_TARGETS,
    FAMILIES,
    PHI3_ORIGINAL_MAX_POSITIONS,
    SLIDING_WINDOW,
    make_tiny_adapter,
    make_tiny_family,
)

PROBE = "tiny_families_probe"
ATOL = 1e-4
"""fp32 logits of the probe vs transformers' own attention (sdpa or eager)."""


class _Probe:
    """An attention function that uses only its kwargs, never a transformers-built mask.

    Semantics, per layer and head: query i may see key j iff seq[j] == seq[i] and
    0 <= pos[i] - pos[j] < sliding_window (no upper bound when None); scores are
    q·k * scaling, then softcap * tanh(scores / softcap) when softcap is given.
    `seq` and `pos` come in as the custom kwargs `probe_seq` / `probe_pos` (shape [T]),
    defaulting to one sequence at positions 0..T-1.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        # query: [B, H, T, D]; key, value: [B, H_kv, T, D]
        self.calls.append(
            {
                "layer_idx": module.layer_idx,
                "attention_mask": attention_mask,
                "kwargs": {k: v for k, v in kwargs.items() if not torch.is_tensor(v)},
                "kwarg_names": set(kwargs),
            }
        )
        t = query.shape[2]
        pos = kwargs.get("probe_pos", torch.arange(t))
        seq = kwargs.get("probe_seq", torch.zeros(t, dtype=torch.long))
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3) * kwargs["scaling"]
        if kwargs.get("softcap") is not None:
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        distance = pos[:, None] - pos[None, :]
        allowed = (seq[:, None] == seq[None, :]) & (distance >= 0)
        if kwargs.get("sliding_window") is not None:
            allowed &= distance < kwargs["sliding_window"]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def probe() -> _Probe:
    from transformers import AttentionInterface

    fn = _Probe()
    AttentionInterface.register(PROBE, fn)
    return fn


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    return name, make_tiny_family(name, tmp_path_factory.mktemp(name) / "base")


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def _expected_windows(config) -> list[int | None]:
    """Per layer, the `sliding_window` kwarg transformers should pass: per `layer_types`
    where the config has them (qwen2/3, gemma2/3), else the config's window on every layer."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [getattr(config, "sliding_window", None)] * config.num_hidden_layers
    return [config.sliding_window if t == "sliding_attention" else None for t in layer_types]


def test_checkpoint_loads_and_generates(family) -> None:
    name, path = family
    model = _load(path)
    assert model.config.model_type == name
    assert next(model.parameters()).dtype == torch.float32
    prompt = torch.tensor([[5, 17, 40, 99, 120, 7]])
    out = model.generate(
        prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
    )
    new = out[0, prompt.shape[1] :].tolist()
    assert len(new) == 20
    assert len(set(new)) > 3, f"{name} greedy output is degenerate: {new}"


def test_weights_are_a_function_of_the_seed(family, tmp_path: Path) -> None:
    name, path = family
    same = _load(make_tiny_family(name, tmp_path / "same", seed=0)).state_dict()
    other = _load(make_tiny_family(name, tmp_path / "other", seed=1)).state_dict()
    for key, value in _load(path).state_dict().items():
        assert torch.equal(value, same[key]), key
    assert any(not torch.equal(value, other[key]) for key, value in same.items())


def test_family_features_are_on(family) -> None:
    name, path = family
    config = _load(path).config
    if name == "llama":
        assert config.rope_parameters["rope_type"] == "llama3" and config.tie_word_embeddings
    if name in ("mistral", "gemma2", "gemma3_text"):
        assert config.sliding_window == SLIDING_WINDOW < config.max_position_embeddings
    if name in ("gemma2", "gemma3_text"):
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}
        assert config.final_logit_softcapping and config.attn_logit_softcapping
        assert config.query_pre_attn_scalar != config.head_dim
    if name == "qwen3":
        assert config.head_dim != config.hidden_size // config.num_attention_heads
    if name == "phi3":
        assert config.rope_parameters["rope_type"] == "longrope"
        rope = config.rope_parameters
        assert rope["original_max_position_embeddings"] == PHI3_ORIGINAL_MAX_POSITIONS
    if name == "granite":
        assert config.embedding_multiplier != 1 and config.residual_multiplier != 1
        assert config.logits_scaling != 1
    if name == "qwen3_moe":
        assert config.mlp_only_layers == [0] and config.num_experts > 1


def test_peft_adapter_applies_and_changes_logits(family, tmp_path: Path) -> None:
    from peft import PeftModel

    name, path = family
    targets = ATTENTION_PROJECTIONS if name == "qwen3_moe" else DEFAULT_TARGETS[name]
    adapter = make_tiny_adapter(
        path, tmp_path / "adapter", family=name, seed=1, r=4, alpha=8, target_modules=targets
    )
    ids = _ids(12)
    with torch.no_grad():
        base_logits = _load(path)(ids).logits
        model = PeftModel.from_pretrained(_load(path), adapter).eval()
        lora_logits = model(ids).logits
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(targets)
    assert (lora_logits - base_logits).abs().max() > 0.1


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
def test_moe_default_adapter_adapts_the_experts(tmp_path: Path) -> None:
    """On qwen3_moe, PEFT turns gate/up/down_proj targets into LoRA on the expert stacks
    (`target_parameters`, fused gate_up at twice the rank), even though layer 0's dense MLP
    has Linear modules of those names: the adapter the server must refuse at upload unless
    it serves expert LoRA."""
    from peft import PeftModel

    from tests.tiny_models import read_adapter_config

    base = make_tiny_family("qwen3_moe", tmp_path / "base")
    adapter = make_tiny_adapter(base, tmp_path / "experts", family="qwen3_moe", seed=1, r=4)
    config = read_adapter_config(adapter)
    assert set(config["target_modules"]) == set(ATTENTION_PROJECTIONS)
    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj"}
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 8}
    model = PeftModel.from_pretrained(_load(base), adapter)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert not any(".layers.0.mlp" in n for n in adapted)
    assert any(n.endswith(".layers.1.mlp.experts") for n in adapted)


def test_every_layer_attends_through_the_interface(family, probe: _Probe) -> None:
    """No mask is built for the probe; its kwargs alone reproduce transformers' logits."""
    _, path = family
    reference = _load(path)
    model = _load(path, attn_implementation=PROBE)
    ids = _ids(2 * SLIDING_WINDOW + 8)
    probe.calls.clear()
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        got = model(ids, use_cache=False).logits
    config = model.config
    layers = model.model.layers
    assert [c["layer_idx"] for c in probe.calls] == list(range(config.num_hidden_layers))
    assert all(c["attention_mask"] is None for c in probe.calls)
    for call, window, layer in zip(probe.calls, _expected_windows(config), layers):
        assert call["kwargs"].get("sliding_window") == window
        assert call["kwargs"]["scaling"] == layer.self_attn.scaling
        if config.model_type == "gemma2":
            assert call["kwargs"]["softcap"] == config.attn_logit_softcapping
        else:
            # gemma3's config has attn_logit_softcapping but transformers 5 does not pass it.
            assert call["kwargs"].get("softcap") is None
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_packed_sequences_with_restarting_positions(family, probe: _Probe) -> None:
    """[1, T] input holding two sequences, positions restarting at 0: rotary embeddings
    take arbitrary position ids, and custom kwargs reach the attention function."""
    _, path = family
    reference = _load(path)
    model = _load(path, attn_implementation=PROBE)
    lengths = (SLIDING_WINDOW + 9, 11)
    ids = _ids(sum(lengths), seed=3)
    pos = torch.cat([torch.arange(n) for n in lengths])
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    probe.calls.clear()
    with torch.no_grad():
        packed = model(
            ids, position_ids=pos[None], use_cache=False, probe_pos=pos, probe_seq=seq
        ).logits
        alone = [reference(part, use_cache=False).logits for part in ids.split(lengths, dim=1)]
    assert {"probe_pos", "probe_seq", "position_ids"} <= probe.calls[0]["kwarg_names"]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=0, atol=ATOL)


def test_custom_implementation_gets_no_mask_even_with_padding(probe: _Probe, tmp_path) -> None:
    """masking_utils skips mask building for an implementation it has no mask function
    for, dropping a 2D padding mask; a registered mask function's result (None included)
    is passed through as is."""
    from transformers.masking_utils import AttentionMaskInterface

    path = make_tiny_family("mistral", tmp_path / "mistral")
    ids = _ids(20)
    padding = torch.ones_like(ids)
    padding[0, :4] = 0
    model = _load(path, attn_implementation=PROBE)
    probe.calls.clear()
    with torch.no_grad():
        model(ids, attention_mask=padding, use_cache=False)
    assert all(c["attention_mask"] is None for c in probe.calls)

    marker = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    for returned in (marker, None):
        seen: list[dict] = []

        def mask_fn(returned=returned, seen=seen, **kwargs):
            seen.append(kwargs)
            return returned

        AttentionMaskInterface.register(PROBE, mask_fn)
        try:
            probe.calls.clear()
            with torch.no_grad():
                model(ids, attention_mask=padding, use_cache=False)
        finally:
            # GeneralInterface has no public unregister; masking_utils reads _global_mapping.
            del AttentionMaskInterface._global_mapping[PROBE]
        assert seen and seen[0]["local_size"] == SLIDING_WINDOW
        assert all(c["attention_mask"] is returned for c in probe.calls)


def test_phi3_longrope_switches_on_the_largest_position_in_the_forward(
    probe: _Probe, tmp_path: Path
) -> None:
    """Longrope picks short or long factors for the whole forward from max(position_ids):
    a short sequence packed with a long one gets the long factors."""
    path = make_tiny_family("phi3", tmp_path / "phi3")
    reference = _load(path)
    model = _load(path, attn_implementation=PROBE)
    lengths = (PHI3_ORIGINAL_MAX_POSITIONS + 6, 10)
    ids = _ids(sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    with torch.no_grad():
        packed = model(
            ids, position_ids=pos[None], use_cache=False, probe_pos=pos, probe_seq=seq
        ).logits
        long_alone, short_alone = (
            reference(part, use_cache=False).logits for part in ids.split(lengths, dim=1)
        )
    torch.testing.assert_close(packed[:, : lengths[0]], long_alone, rtol=0, atol=ATOL)
    assert (packed[:, lengths[0] :] - short_alone).abs().max() > 0.1
