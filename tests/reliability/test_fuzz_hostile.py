"""Property-based fuzzing of request bodies, form fields and JSONL lines with what hostile
clients send: invalid Unicode, deep nesting, extreme numbers.

Runs against a real uvicorn server (real HTTP parsing, real multipart) over the fake engine,
a real registry and a real fine-tuning service. For every example:

- the answer is never a 5xx, and every error carries the envelope;
- a refused request stores nothing (adapter, file and job listings are unchanged), and the
  listings themselves still answer 200;
- `/health`, polled from another thread for the whole run, answers within 2 s.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.fake_engine import BASE_ID
from tests.finetune.conftest import TRAIN_LINES
from tests.live_server import serve
from tests.reliability.conftest import FullApp, assert_error_envelope, build_full_app
from tests.reliability.test_hostile_requests import HEALTH_DEADLINE_S, HealthProbe

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# --- what hostile JSON looks like, as raw text -----------------------------------------------

hostile_atoms = st.sampled_from(
    [
        '"\\ud800"',
        '"x\\udfffy"',
        '"\\uDBFF\\u0041"',
        '{"\\ud800": 1}',
        str(2**64),
        str(-(2**63) - 1),
        str(2**200),
        "9" * 1001,
        "-" + "1" * 1500,
        "1." + "5" * 1200,
        "1e999",
        "-1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "[" * 65 + "]" * 65,
        "[" * 3000 + "]" * 3000,
        '{"a":' * 70 + "1" + "}" * 70,
    ]
).map(lambda text: (text, True))
ordinary_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
).map(lambda value: (json.dumps(value), False))

Fragment = tuple[str, bool]
"""JSON text, and whether it holds a value past the limits somewhere."""


def _array(items: list[Fragment]) -> Fragment:
    return "[" + ",".join(t for t, _ in items) + "]", any(h for _, h in items)


def _object(pairs: list[tuple[str, Fragment]]) -> Fragment:
    text = "{" + ",".join(f"{json.dumps(k)}:{t}" for k, (t, _) in pairs) + "}"
    return text, any(h for _, (_, h) in pairs)


json_fragments = st.recursive(
    st.one_of(ordinary_atoms, hostile_atoms),
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(_array),
        # Distinct keys: with a duplicate, JSON keeps the last value only.
        st.lists(
            st.tuples(st.text(max_size=8), children), max_size=4, unique_by=lambda kv: kv[0]
        ).map(_object),
    ),
    max_leaves=8,
)
"""JSON text with the chance of a hostile value anywhere in it (nesting adds depth, so a
fragment of 62 levels in a template can pass 64 only there: the flag counts atoms only)."""


def _body_with(template: dict[str, Any], field: str, fragment: str) -> bytes:
    """`template` as JSON with `field`'s value replaced by `fragment`, verbatim."""
    marker = "__FUZZ__"
    text = json.dumps({**template, field: marker})
    return text.replace(json.dumps(marker), fragment).encode()


JSON_ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "completions": ("POST", "/v1/completions", {"model": BASE_ID, "prompt": "hi"}),
    "chat": (
        "POST",
        "/v1/chat/completions",
        {"model": BASE_ID, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "jobs": ("POST", "/v1/fine_tuning/jobs", {"model": BASE_ID, "training_file": "file-x"}),
    "alias": ("PUT", "/v1/adapters/seeded/aliases/prod", {"version": 1}),
}

# Form-field values: text and bytes, including encoded surrogates and invalid UTF-8.
form_values = st.one_of(
    st.text(max_size=30),
    json_fragments.map(lambda fragment: fragment[0]),
    st.binary(max_size=30),
    st.sampled_from([b"\xed\xa0\x80", b"ok\xff", b"\xc0\xaf", "a\u2028b".encode()]),
)


# --- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    base_spec: Any,
    tiny_adapters: dict[str, Path],
) -> Iterator[tuple[httpx.Client, FullApp]]:
    built = build_full_app(tmp_path_factory.mktemp("fuzz-hostile"), tiny_base, base_spec)
    built.registry.push(tiny_adapters["r4"], "seeded", alias="prod")
    with serve(built.app) as url, HealthProbe(url) as probe:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, built
        assert probe.latencies, "the health probe never ran"
        assert max(probe.latencies) < HEALTH_DEADLINE_S, max(probe.latencies)
    built.fine_tuning.stop()
    built.registry.close()


def _state(client: httpx.Client) -> tuple[Any, ...]:
    """What a refused request must not change; every listing must answer."""
    listings = []
    for path in ("/v1/adapters", "/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        listings.append(response.json()["data"])
    return tuple(listings)


def _check(response: httpx.Response, what: Any) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_error_envelope(response.json(), status=response.status_code)


@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_hostile_json_bodies(live: tuple[httpx.Client, FullApp], route: str) -> None:
    client, _ = live
    method, path, template = JSON_ROUTES[route]

    @SETTINGS
    @given(
        field=st.sampled_from([*template, "user", "metadata"]),
        fragment=json_fragments,
        whole=st.booleans(),
    )
    def run(field: str, fragment: Fragment, whole: bool) -> None:
        text, hostile = fragment
        body = text.encode() if whole else _body_with(template, field, text)
        before = _state(client)
        response = client.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        _check(response, body[:200])
        if hostile:
            assert response.status_code == 400, (body[:200], response.text[:300])
            assert response.json()["error"]["code"] == "invalid_json", response.text[:300]
        if response.status_code >= 400:
            assert _state(client) == before

    run()


def test_hostile_upload_form_fields(
    live: tuple[httpx.Client, FullApp], tiny_adapters: dict[str, Path]
) -> None:
    client, _ = live
    adapter = tiny_adapters["r4"]
    files = [
        ("files", (name, (adapter / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]

    @SETTINGS
    @given(
        field=st.sampled_from(["name", "alias", "description", "metadata", "sha256"]),
        value=form_values,
    )
    def run(field: str, value: str | bytes) -> None:
        data: dict[str, str | bytes] = {"name": "fuzzed", field: value}
        before = _state(client)
        response = client.post("/v1/adapters", data=data, files=files)
        _check(response, (field, value))
        if response.status_code >= 400:
            assert _state(client) == before

    run()


def test_hostile_training_files(live: tuple[httpx.Client, FullApp]) -> None:
    client, _ = live

    @SETTINGS
    @given(
        fragment=json_fragments,
        purpose=st.one_of(st.just("fine-tune"), form_values),
        position=st.integers(min_value=0, max_value=len(TRAIN_LINES)),
    )
    def run(fragment: Fragment, purpose: str | bytes, position: int) -> None:
        text, hostile = fragment
        lines = list(TRAIN_LINES)
        lines.insert(position, text)
        content = ("\n".join(lines) + "\n").encode()
        before = _state(client)
        response = client.post(
            "/v1/files",
            data={"purpose": purpose},
            files={"file": ("train.jsonl", io.BytesIO(content))},
        )
        _check(response, (text[:100], purpose))
        if hostile:
            assert response.status_code == 400, (text[:100], response.text[:300])
        if response.status_code >= 400:
            assert _state(client) == before

    run()
