"""DoRA layers against HF PEFT's own DoRA layers, for every LoRA backend that runs here.

A toy decoder layer (packed q/k/v with biases, o_proj without) is adapted by PEFT twice, once
with DoRA and once with plain LoRA; the engine's batched layers serve both adapters, a second
DoRA adapter of another rank class and base rows in one mixed batch (decode tokens and
prefill segments), and every token's output must equal PEFT's for its adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapterhub_server.engine.build import _install_lora_layers
from adapterhub_server.lora.adapter import LoRAAdapter, ModuleLoRA, adaptable_modules
from adapterhub_server.lora.cpu_kernel import load as load_cpu_kernel
from adapterhub_server.lora.dora import DoRATables, apply_dora, apply_dora_reference
from adapterhub_server.lora.layers import LoRAContext
from adapterhub_server.lora.ops import BACKENDS, Route, Segment, build_lora_batch
from adapterhub_server.lora.pool import LoRAWeightPool, packed_groups
from adapterhub_server.lora.triton_ops import triton_available
from tests.tiny_models import randomise_dora

HIDDEN, Q_OUT, KV_OUT = 32, 48, 16
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, Q_OUT, bias=True)
        self.k_proj = nn.Linear(HIDDEN, KV_OUT, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV_OUT, bias=True)
        self.o_proj = nn.Linear(Q_OUT, HIDDEN, bias=False)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()


class _Toy(nn.Module):
    """Module paths as in a decoder: ``layers.0.self_attn.q_proj`` and so on."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])


def _toy() -> _Toy:
    torch.manual_seed(0)
    toy = _Toy().eval()
    with torch.no_grad():
        for p in toy.parameters():
            p.normal_(0, 0.3)
    return toy


def _peft(
    toy: _Toy, *, seed: int, dora: bool, r: int, targets: tuple[str, ...], rslora: bool = False
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        lora_dropout=0.0,
        use_dora=dora,
        use_rslora=rslora,
    )
    model = get_peft_model(copy.deepcopy(toy), config)
    randomise_dora(model, seed)
    return model.eval()


def _as_adapter(name: str, peft_model: nn.Module) -> LoRAAdapter:
    """The adapter as `load_adapter` would give it, read from PEFT's live layers."""
    modules = {}
    for path, layer in peft_model.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        magnitude = None
        if "default" in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone()
        modules[path] = ModuleLoRA(
            a=layer.lora_A["default"].weight.detach().clone(),
            b=layer.lora_B["default"].weight.detach().clone(),
            scale=float(layer.scaling["default"]),
            magnitude=magnitude,
        )
    rank = max(m.rank for m in modules.values())
    return LoRAAdapter(name=name, modules=modules, rank=rank, config={}, source="")


def _backends() -> list:
    out: list = ["torch"]
    cpu = pytest.mark.skipif(load_cpu_kernel() is None, reason="the CPU kernel does not build")
    out.append(pytest.param("cpu", marks=cpu))
    triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
    out.append(pytest.param("triton", marks=triton))
    return out


@pytest.fixture(scope="module")
def setup():
    toy = _toy()
    refs = {
        None: toy,
        "dora": _peft(toy, seed=1, dora=True, r=8, targets=("q_proj", "v_proj", "o_proj")),
        "plain": _peft(toy, seed=2, dora=False, r=8, targets=ATTENTION),
        "dora16": _peft(toy, seed=3, dora=True, r=16, targets=ATTENTION, rslora=True),
    }
    served = copy.deepcopy(toy)
    targets = adaptable_modules(served)
    groups = packed_groups(targets)
    pool = LoRAWeightPool(groups, max_slots=4)
    context = LoRAContext()
    _install_lora_layers(served, groups, pool, context)
    routes: dict[str, Route] = {"dora": (8, 0), "plain": (8, 1), "dora16": (16, 0)}
    for name, route in routes.items():
        pool.write(route, _as_adapter(name, refs[name]))
    return refs, served, pool, context, routes


def _reference_outputs(model: nn.Module, x: torch.Tensor, xo: torch.Tensor) -> torch.Tensor:
    attn = (model.base_model.model if hasattr(model, "base_model") else model).layers[0].self_attn
    with torch.no_grad():
        return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(xo)], -1)


@pytest.mark.parametrize("backend", _backends())
def test_mixed_batch_equals_peft_dora_layers(setup, backend: str) -> None:
    refs, served, pool, context, routes = setup
    order = ["dora", None, "plain", "dora", "dora16", None, "plain"]
    dense = [routes[n] if n else None for n in order]
    segments, names = [], list(order)
    t = len(order)
    for name, n in (("dora", 5), ("plain", 3), ("dora16", 4)):
        segments.append(Segment(t, t + n, *routes[name]))
        names += [name] * n
        t += n
    names += [None] * 2  # a base prefill after the segments
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(len(names), HIDDEN, generator=gen)
    xo = torch.randn(len(names), Q_OUT, generator=gen)

    context.batch = build_lora_batch(
        dense, segments, backend=BACKENDS[backend], dora_rows=pool.dora_rows
    )
    attn = served.layers[0].self_attn
    with torch.no_grad():
        got = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(xo)], -1)
    context.batch = None

    for t, name in enumerate(names):
        want = _reference_outputs(refs[name], x[t : t + 1], xo[t : t + 1])[0]
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5, msg=f"token {t} {name}")


def test_dora_differs_from_its_plain_lora(setup) -> None:
    """The rescale matters: serving the DoRA adapter's A and B as plain LoRA is far off,
    so the equality above cannot hold by accident."""
    refs, served, _, context, routes = setup
    x = torch.randn(3, HIDDEN)
    xo = torch.randn(3, Q_OUT)
    context.batch = build_lora_batch([routes["dora"]] * 3)  # no DoRA rows: plain LoRA
    attn = served.layers[0].self_attn
    with torch.no_grad():
        plain = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(xo)], -1)
    context.batch = None
    want = _reference_outputs(refs["dora"], x, xo)
    assert (plain - want).abs().max() > 0.1
    # k_proj is not adapted by "dora": its columns are the base's, both ways.
    k = slice(Q_OUT, Q_OUT + KV_OUT)
    torch.testing.assert_close(plain[:, k], want[:, k])


def test_bias_stays_outside_the_scale(setup) -> None:
    """q/k/v carry biases: the scale multiplies W x + s B A x, never the bias."""
    _, _, pool, _, routes = setup
    row = pool.dora_rows[routes["dora"]]
    tables = pool.dora_tables("layers.0.self_attn.qkv_proj")
    assert tables is not None and tables.shift is not None
    g = tables.scale[row]
    assert (g[:Q_OUT] - 1).abs().max() > 0.05  # q is DoRA-adapted
    assert torch.equal(g[Q_OUT : Q_OUT + KV_OUT], torch.ones(KV_OUT))  # k is not
    assert pool.dora_tables("layers.0.self_attn.o_proj").shift is None  # no bias there


@pytest.mark.parametrize("every_row", [False, True])
def test_apply_dora_equals_the_loop(every_row: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    rows, width, tokens = 5, 12, 9
    scale = torch.rand(rows, width, generator=gen) + 0.5
    scale[0] = 1
    bias = torch.randn(width, generator=gen)
    tables = DoRATables(scale=scale, shift=(1 - scale) * bias)
    y = torch.randn(tokens, width, generator=gen)
    if every_row:
        row_of = [3, 0, 1, 0, 4, 4, 0, 2, 1]
        token_rows = {t: k for t, k in enumerate(row_of) if k != 0}
        index = None
    else:
        token_rows = {7: 2, 1: 4, 4: 4, 0: 1}
        index = torch.tensor(list(token_rows))
        row_of = list(token_rows.values())
    want = y.clone()
    apply_dora_reference(want, scale, bias, token_rows)
    got = y.clone()
    apply_dora(got, tables, index, torch.tensor(row_of))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    untouched = [t for t in range(tokens) if t not in token_rows]
    assert torch.equal(got[untouched], y[untouched])
