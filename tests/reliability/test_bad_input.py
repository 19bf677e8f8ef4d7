"""The catalogue of DESIGN.md's first reliability rule: bad input gets a clear 4xx and changes
nothing.

One test per item of the rule (parametrized where the item has several forms), each against
the real server (tiny engine, real registry) in-process. Each asserts the status, the error
envelope with a fitting `param`/`code`, and that nothing changed: the registry's listing,
its index (no name reserved, no pending row), the files under its root, and the engine (no
request left running; a good request still answers the same).

| rule item                                  | test                                       |
|--------------------------------------------|--------------------------------------------|
| malformed JSON                             | test_malformed_json                        |
| unknown adapter (404)                      | test_unknown_adapter_is_404                |
| prompt + max_tokens over the context (400) | test_prompt_plus_max_tokens_over_context   |
| out-of-range sampling values               | test_out_of_range_sampling_values          |
| pickle uploads                             | test_pickle_uploads_are_refused            |
| truncated safetensors                      | test_truncated_safetensors                 |
| lying safetensors header                   | test_lying_safetensors_header              |
| NaN/Inf weights                            | test_non_finite_weights                    |
| rank above the limit                       | test_rank_above_the_limit                  |
| target modules / shapes not of the base    | test_modules_or_shapes_not_of_the_base     |
| names with `/`, `..`, `%2e`                | test_hostile_names_in_uploads, ..._in_paths |
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.engine.sampling_params import MAX_STOP_STRINGS
from adapterhub_server.registry import Registry
from adapterhub_server.server import build_app, build_server
from tests.reliability.conftest import assert_error_envelope

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_MODEL_LEN = 128
MAX_LORA_RANK = 16
GOOD_REQUEST = {
    "model": "tiny-base",
    "prompt": "hello world",
    "max_tokens": 4,
    "temperature": 0,
    "ignore_eos": True,
}


@dataclass
class Served:
    client: TestClient
    registry: Registry
    root: Path
    baseline: str
    """The greedy answer to GOOD_REQUEST, before any bad input."""


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("bad-input") / "registry"
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=root,
        fine_tuning=False,
        max_upload_bytes=1_000_000,
        engine=EngineConfig(
            max_num_seqs=4, max_loras=2, max_lora_rank=MAX_LORA_RANK, max_model_len=MAX_MODEL_LEN
        ),
    )
    server = build_server(config)
    assert server.registry is not None
    with TestClient(build_app(server.engine, server), raise_server_exceptions=False) as client:
        baseline = client.post("/v1/completions", json=GOOD_REQUEST)
        assert baseline.status_code == 200, baseline.text
        yield Served(client, server.registry, root, baseline.json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def good_adapter(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["r8"]


def _tree(root: Path) -> list[tuple[str, int]]:
    """Every file under the registry except the index's own (its WAL changes on reads)."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("registry.db")
    )


@dataclass(frozen=True)
class Snapshot:
    listing: Any
    tree: list[tuple[str, int]]
    names: frozenset[str]
    pending: int


def snapshot(s: Served) -> Snapshot:
    with s.registry.index._read() as conn:  # type: ignore[attr-defined]
        names = frozenset(n for (n,) in conn.execute("SELECT name FROM adapters"))
    return Snapshot(
        listing=s.client.get("/v1/adapters").json(),
        tree=_tree(s.root),
        names=names,
        pending=len(s.registry.index.pending()),
    )


def assert_rejected(
    s: Served,
    before: Snapshot,
    response: Any,
    *,
    status: int = 400,
    param: str | type[Any] | None = Any,
    code: str | type[Any] | None = Any,
    mentions: str = "",
) -> dict[str, Any]:
    """The bad request got `status` with the envelope, and nothing changed anywhere."""
    assert response.status_code == status, response.text
    error = assert_error_envelope(response.json(), status=status)
    if param is not Any:
        assert error["param"] == param, error
    if code is not Any:
        assert error["code"] == code, error
    assert mentions.lower() in error["message"].lower(), error
    assert snapshot(s) == before
    assert list((s.root / ".staging").iterdir()) == []
    stats = s.client.app.state.engine.stats()  # type: ignore[attr-defined]
    assert stats.running == 0 and stats.waiting == 0
    again = s.client.post("/v1/completions", json=GOOD_REQUEST)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == s.baseline
    return error


def upload(
    s: Served, name: str, files: dict[str, bytes], **form: str
) -> Any:  # the TestClient's response
    parts = [("files", (filename, content)) for filename, content in files.items()]
    return s.client.post("/v1/adapters", data={"name": name, **form}, files=parts)


def adapter_files(src: Path) -> dict[str, bytes]:
    return {CONFIG: (src / CONFIG).read_bytes(), WEIGHTS: (src / WEIGHTS).read_bytes()}


def with_tensors(
    src: Path, tmp_path: Path, mutate: Callable[[dict[str, torch.Tensor]], None]
) -> dict[str, bytes]:
    tensors = load_file(src / WEIGHTS)
    mutate(tensors)
    save_file(tensors, tmp_path / WEIGHTS)
    return {CONFIG: (src / CONFIG).read_bytes(), WEIGHTS: (tmp_path / WEIGHTS).read_bytes()}


# -- inference requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/v1/completions", b'{"model": "tiny-base", "prompt": "hi"', "application/json"),
        ("/v1/completions", b"{'model': 'tiny-base'}", "application/json"),
        ("/v1/chat/completions", b'{"model": "tiny-base", "messages": [', "application/json"),
        ("/v1/chat/completions", b"\xff\xfe not utf-8", "application/json"),
        ("/v1/completions", b'"just a string"', "application/json"),
        ("/v1/adapters/x/aliases/prod", b'{"version": ', "application/json"),
    ],
)
def test_malformed_json(served: Served, path: str, body: bytes, content_type: str) -> None:
    before = snapshot(served)
    method = "PUT" if "/aliases/" in path else "POST"
    response = served.client.request(
        method, path, content=body, headers={"content-type": content_type}
    )
    assert_rejected(served, before, response, code="invalid_json")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("model", ["no-such-adapter", "no-such-adapter@3", "no-such@prod"])
def test_unknown_adapter_is_404(served: Served, route: str, model: str) -> None:
    before = snapshot(served)
    body: dict[str, Any] = {"model": model, "max_tokens": 2}
    if route.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    response = served.client.post(route, json=body)
    assert_rejected(served, before, response, status=404, param="model", mentions="no-such")


def test_unknown_adapter_version_is_404(served: Served, good_adapter: Path) -> None:
    """A known name with an unknown version or alias is a 404 too, and reserves nothing."""
    assert upload(served, "known", adapter_files(good_adapter)).status_code == 201
    before = snapshot(served)
    for model in ("known@9", "known@nope"):
        response = served.client.post(
            "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
        )
        assert_rejected(served, before, response, status=404, param="model")


@pytest.mark.parametrize(
    ("prompt", "max_tokens"),
    [
        ("hello world", MAX_MODEL_LEN),  # fits alone, not with the prompt
        ("hello world " * 100, 1),  # the prompt alone is over the context
    ],
)
def test_prompt_plus_max_tokens_over_context(served: Served, prompt: str, max_tokens: int) -> None:
    before = snapshot(served)
    for route, body in (
        ("/v1/completions", {"prompt": prompt}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
    ):
        response = served.client.post(
            route, json={"model": "tiny-base", "max_tokens": max_tokens, **body}
        )
        assert_rejected(served, before, response, code="context_length_exceeded")


OUT_OF_RANGE = [
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("n", 0),
    ("n", 129),  # MAX_N is 128
    ("logprobs", 21),
    ("logprobs", -1),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
    ("stop", 42),
    ("seed", "abc"),
]


@pytest.mark.parametrize(
    ("param", "value"), OUT_OF_RANGE, ids=[f"{p}={v}"[:30] for p, v in OUT_OF_RANGE]
)
def test_out_of_range_sampling_values(served: Served, param: str, value: Any) -> None:
    before = snapshot(served)
    body = {"model": "tiny-base", "prompt": "hi", "max_tokens": 2, param: value}
    response = served.client.post("/v1/completions", json=body)
    error = assert_rejected(served, before, response)
    assert error["param"] is not None and error["param"].split("[")[0] == param, error


@pytest.mark.parametrize(
    ("param", "value"), [("temperature", 3.0), ("top_p", -1.0), ("top_logprobs", 50), ("n", 200)]
)
def test_out_of_range_sampling_values_in_chat(served: Served, param: str, value: Any) -> None:
    before = snapshot(served)
    body = {
        "model": "tiny-base",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "logprobs": True,
        param: value,
    }
    response = served.client.post("/v1/chat/completions", json=body)
    error = assert_rejected(served, before, response)
    assert error["param"] == param, error


# -- adapter uploads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights_name",
    ["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin", "adapter.pkl", "model.ckpt"],
)
def test_pickle_uploads_are_refused(served: Served, good_adapter: Path, weights_name: str) -> None:
    before = snapshot(served)
    pickled = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."  # pickle of {}
    files = {CONFIG: (good_adapter / CONFIG).read_bytes(), weights_name: pickled}
    response = upload(served, "pickled", files)
    assert_rejected(served, before, response, param="file", mentions="pickle")


def test_pickle_bytes_under_the_safetensors_name(served: Served, good_adapter: Path) -> None:
    """Renaming a pickle does not get it unpickled: it is not a safetensors file."""
    before = snapshot(served)
    files = {CONFIG: (good_adapter / CONFIG).read_bytes(), WEIGHTS: b"\x80\x04\x95" + b"\0" * 64}
    response = upload(served, "pickled", files)
    assert_rejected(served, before, response, mentions="safetensors")


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1])
def test_truncated_safetensors(served: Served, good_adapter: Path, keep: int) -> None:
    """Cut anywhere: inside the length prefix, inside the header, inside the data."""
    before = snapshot(served)
    data = (good_adapter / WEIGHTS).read_bytes()
    files = {CONFIG: (good_adapter / CONFIG).read_bytes(), WEIGHTS: data[:keep]}
    response = upload(served, "truncated", files)
    assert_rejected(served, before, response, mentions="safetensors")


def _rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _first_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in header.items() if k != "__metadata__")


def _offsets_past_the_end(header: dict[str, Any]) -> None:
    _first_tensor(header)["data_offsets"][1] += 10_000_000


def _overlapping(header: dict[str, Any]) -> None:
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    tensors[1]["data_offsets"] = list(tensors[0]["data_offsets"])


def _shape_disagrees_with_offsets(header: dict[str, Any]) -> None:
    _first_tensor(header)["shape"] = [100_000, 100_000]


def _header_length_past_the_end(data: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + data[8:]


@pytest.mark.parametrize(
    "lie",
    [
        lambda d: _rewrite_header(d, _offsets_past_the_end),
        lambda d: _rewrite_header(d, _overlapping),
        lambda d: _rewrite_header(d, _shape_disagrees_with_offsets),
        _header_length_past_the_end,
    ],
    ids=["offsets-past-end", "overlapping", "shape-vs-offsets", "header-length"],
)
def test_lying_safetensors_header(
    served: Served, good_adapter: Path, lie: Callable[[bytes], bytes]
) -> None:
    before = snapshot(served)
    files = {
        CONFIG: (good_adapter / CONFIG).read_bytes(),
        WEIGHTS: lie((good_adapter / WEIGHTS).read_bytes()),
    }
    response = upload(served, "liar", files)
    assert_rejected(served, before, response)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(
    served: Served, good_adapter: Path, tmp_path: Path, value: float
) -> None:
    before = snapshot(served)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = sorted(tensors)[-1]
        tensors[key][0, 0] = value

    response = upload(served, "poisoned", with_tensors(good_adapter, tmp_path, poison))
    error = assert_rejected(served, before, response)
    assert "nan" in error["message"].lower() or "inf" in error["message"].lower(), error


def test_rank_above_the_limit(served: Served, tiny_adapters: dict[str, Path]) -> None:
    before = snapshot(served)
    response = upload(served, "too-wide", adapter_files(tiny_adapters["r32"]))  # 32 > 16
    error = assert_rejected(served, before, response)
    assert "rank" in error["message"].lower() and str(MAX_LORA_RANK) in error["message"], error


def _rename_module(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if ".q_proj." in k]:
        tensors[key.replace(".q_proj.", ".qq_proj.")] = tensors.pop(key)


def _layer_past_the_base(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if ".layers.0." in k]:
        tensors[key.replace(".layers.0.", ".layers.7.")] = tensors.pop(key)


def _wrong_in_features(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


def _wrong_out_features(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("down_proj.lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, tensors[key].shape[1])


def _ranks_disagree(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("v_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] - 1, tensors[key].shape[1])


def _a_without_b(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[next(k for k in tensors if k.endswith("k_proj.lora_B.weight"))]


@pytest.mark.parametrize(
    "mutate",
    [
        _rename_module,
        _layer_past_the_base,
        _wrong_in_features,
        _wrong_out_features,
        _ranks_disagree,
        _a_without_b,
    ],
)
def test_modules_or_shapes_not_of_the_base(
    served: Served, good_adapter: Path, tmp_path: Path, mutate: Callable[..., None]
) -> None:
    before = snapshot(served)
    response = upload(served, "mismatched", with_tensors(good_adapter, tmp_path, mutate))
    assert_rejected(served, before, response)


@pytest.mark.parametrize(
    "config_change",
    [
        {"target_modules": ["lm_head"]},
        {"target_modules": ["embed_tokens"]},
        {"use_dora": True},
        {"bias": "all"},
        {"modules_to_save": ["lm_head"]},
        {"r": 0},
    ],
    ids=["lm_head", "embed_tokens", "dora", "bias", "modules_to_save", "r0"],
)
def test_configs_the_server_cannot_serve(
    served: Served, good_adapter: Path, config_change: dict[str, Any]
) -> None:
    before = snapshot(served)
    config = {**json.loads((good_adapter / CONFIG).read_text()), **config_change}
    files = {CONFIG: json.dumps(config).encode(), WEIGHTS: (good_adapter / WEIGHTS).read_bytes()}
    response = upload(served, "unservable", files)
    assert_rejected(served, before, response)


# -- names --------------------------------------------------------------------------------

HOSTILE_NAMES = ["a/b", "..", "../escape", "%2e%2e", "%2e%2e%2fetc", "a%2fb", ".hidden", "A", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_uploads(served: Served, good_adapter: Path, name: str) -> None:
    before = snapshot(served)
    response = upload(served, name, adapter_files(good_adapter))
    assert_rejected(served, before, response, param="name" if name else Any)


@pytest.mark.parametrize("alias", ["a/b", "..", "%2e%2e", "7", "latest"])
def test_hostile_aliases(served: Served, good_adapter: Path, alias: str) -> None:
    before = snapshot(served)
    response = upload(served, "aliased", adapter_files(good_adapter), alias=alias)
    assert_rejected(served, before, response, param="alias")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/adapters/%2e%2e",
        "/v1/adapters/..%2f..%2fetc",
        "/v1/adapters/%2e%2e/versions/1",
        "/v1/adapters/known/versions/1/files/..%2f..%2fregistry.db",
        "/v1/adapters/known/versions/1/files/%2e%2e",
        "/v1/adapters/known/versions/1/files/.hidden",
    ],
)
def test_hostile_names_in_paths(served: Served, good_adapter: Path, path: str) -> None:
    """Traversal through a path parameter is a 4xx and reads or changes nothing."""
    if served.client.get("/v1/adapters/known").status_code == 404:
        assert upload(served, "known", adapter_files(good_adapter)).status_code == 201
    before = snapshot(served)
    response = served.client.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert_error_envelope(response.json(), status=response.status_code)
    assert b"SQLite" not in response.content
    assert snapshot(served) == before
    if "/files/" not in path:  # (a file path's version prefix is a real, deletable version)
        deleted = served.client.delete(path)
        assert 400 <= deleted.status_code < 500, deleted.text
        assert snapshot(served) == before


@pytest.mark.parametrize("model", ["../x", "a/b", "%2e%2e", "known@..", "known@a/b"])
def test_hostile_names_as_model(served: Served, model: str) -> None:
    before = snapshot(served)
    response = served.client.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code in (400, 404), response.text
    assert_rejected(served, before, response, status=response.status_code, param="model")
