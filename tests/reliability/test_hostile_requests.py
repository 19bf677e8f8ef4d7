"""Hostile request bodies (issue 13): JSON past the limits, too many prompts, prompts longer
in bytes than the context can hold, and heavy requests that must not stall the event loop.

Each case was a 500, a 429 that could never succeed, or a server frozen for seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from adapterhub_server.api import create_app
from adapterhub_server.config import EngineConfig, ServerConfig
from tests.api.fake_engine import BASE_ID, FakeEngine
from tests.finetune.conftest import TRAIN_LINES, jsonl
from tests.live_server import serve
from tests.reliability.conftest import FullApp, assert_error_envelope, build_full_app

# Raw JSON fragments a body may carry where a value goes, and why each is refused.
HOSTILE_VALUES = {
    "lone surrogate": '"a\\ud800b"',
    "low surrogate alone": '"\\udfff"',
    "int past 64 bits": str(2**64),
    "negative int past 64 bits": str(-(2**63) - 1),
    "1001 digits": "9" * 1001,
    "long float literal": "0." + "1" * 1000,
    "float overflow": "1e999",
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "65 levels": "[" * 65 + "]" * 65,
    "100000 levels": "[" * 100_000,
    "2**20 + 1 values": json.dumps([0] * (2**20 + 1)),
}

ROUTES = {
    "completions": ("POST", "/v1/completions", {"model": BASE_ID, "prompt": "hi", "user": None}),
    "chat": (
        "POST",
        "/v1/chat/completions",
        {"model": BASE_ID, "messages": [{"role": "user", "content": None}]},
    ),
    "fine-tuning": (
        "POST",
        "/v1/fine_tuning/jobs",
        {"model": BASE_ID, "training_file": "file-x", "suffix": None},
    ),
    "alias": ("PUT", "/v1/adapters/seeded/aliases/prod", {"version": None}),
}


def _with_hostile(template: dict[str, Any], fragment: str) -> bytes:
    """The template as JSON text with its `null` replaced by `fragment`, verbatim."""
    text = json.dumps(template)
    assert text.count("null") == 1
    return text.replace("null", fragment).encode()


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case", list(HOSTILE_VALUES))
def test_hostile_json_is_a_400_that_changes_nothing(
    full_app: FullApp, tiny_adapters: dict[str, Path], route: str, case: str
) -> None:
    full_app.registry.push(tiny_adapters["r4"], "seeded", alias="prod")
    method, path, template = ROUTES[route]
    body = _with_hostile(template, HOSTILE_VALUES[case])
    with TestClient(full_app.app, raise_server_exceptions=False) as client:
        before = (client.get("/v1/adapters").json(), client.get("/v1/fine_tuning/jobs").json())
        response = client.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        error = assert_error_envelope(response.json(), status=400)
        assert error["code"] == "invalid_json", error
        after = (client.get("/v1/adapters").json(), client.get("/v1/fine_tuning/jobs").json())
    assert after == before
    assert not full_app.engine.calls


def test_sixty_four_levels_of_nesting_are_still_json(full_app: FullApp) -> None:
    """The limit is exact: 64 levels parse (and fail validation as an ordinary 400)."""
    nested = "[" * 63 + "]" * 63  # inside the top-level object: 64 levels in all
    body = f'{{"model": "{BASE_ID}", "prompt": "hi", "stop": {nested}}}'.encode()
    with TestClient(full_app.app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    error = assert_error_envelope(response.json(), status=400)
    assert error["code"] == "invalid_value" and error["param"] == "stop", error


def test_a_large_body_is_validated_off_the_loop_and_still_answers(full_app: FullApp) -> None:
    """A body past the inline threshold goes through the worker-thread path: a valid one is
    served, an invalid one gets FastAPI's ordinary 400 naming the field."""
    prompt = "word " * 40_000
    with TestClient(full_app.app, raise_server_exceptions=False) as client:
        bad = client.post("/v1/completions", json={"model": BASE_ID, "prompt": prompt, "n": 0})
        assert bad.status_code == 400
        assert assert_error_envelope(bad.json(), status=400)["param"] == "n"
        ok = client.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "user": prompt})
        assert ok.status_code == 200, ok.text
    assert len(full_app.engine.calls) == 1


# --- prompts per request --------------------------------------------------------------------


@pytest.fixture
def fake_client() -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield client, engine


@pytest.mark.parametrize("count", [65, 300])
def test_too_many_prompts_is_a_400_not_a_429(
    fake_client: tuple[TestClient, FakeEngine], count: int
) -> None:
    """A few hundred prompts used to get 429 + Retry-After forever (more than the queue can
    ever hold): retrying clients looped."""
    client, engine = fake_client
    response = client.post("/v1/completions", json={"model": BASE_ID, "prompt": ["hi"] * count})
    assert response.status_code == 400, response.text
    assert "retry-after" not in response.headers
    error = assert_error_envelope(response.json(), status=400)
    assert error["param"] == "prompt" and "64" in error["message"], error
    assert not engine.calls


def test_the_prompt_limit_admits_exactly_its_number(
    fake_client: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = fake_client
    response = client.post("/v1/completions", json={"model": BASE_ID, "prompt": ["hi"] * 64})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 64 == len(engine.calls)


def test_the_prompt_limit_is_configurable() -> None:
    engine = FakeEngine()
    app = create_app(engine, max_prompts_per_request=2)
    with TestClient(app, raise_server_exceptions=False) as client:
        three = client.post("/v1/completions", json={"model": BASE_ID, "prompt": ["a", "b", "c"]})
        assert three.status_code == 400
        two = client.post("/v1/completions", json={"model": BASE_ID, "prompt": ["a", "b"]})
        assert two.status_code == 200
        chat = client.post(
            "/v1/chat/completions",
            json={"model": BASE_ID, "messages": [{"role": "user", "content": "a"}], "n": 3},
        )
        assert chat.status_code == 400  # n > 2 here (and n > 1 is not served yet)


def test_the_prompt_limit_is_capped_at_what_the_engine_can_admit() -> None:
    """A small engine cannot hold 64 prompts at once: more than it can ever admit is a 400
    there, never a 429 that retrying cannot cure."""
    small = EngineConfig(max_num_seqs=8, max_queued_requests=16)
    assert ServerConfig(engine=small).prompts_per_request_limit == 24
    assert ServerConfig(max_prompts_per_request=10, engine=small).prompts_per_request_limit == 10
    assert ServerConfig().prompts_per_request_limit == 64
    with pytest.raises(ValueError):
        ServerConfig(max_prompts_per_request=0)


def test_a_small_server_answers_400_for_more_prompts_than_it_can_hold(
    tiny_base: Path,
) -> None:
    from adapterhub_server.server import build_app, build_server

    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=None,
        engine=EngineConfig(max_num_seqs=2, max_queued_requests=2, max_num_batched_tokens=64),
    )
    server = build_server(config)
    with TestClient(build_app(server.engine, server), raise_server_exceptions=False) as client:
        five = client.post(
            "/v1/completions", json={"model": "tiny-base", "prompt": ["a"] * 5, "max_tokens": 2}
        )
        four = client.post(
            "/v1/completions", json={"model": "tiny-base", "prompt": ["a"] * 4, "max_tokens": 2}
        )
    assert five.status_code == 400, five.text
    assert four.status_code == 200, four.text
    assert len(four.json()["choices"]) == 4


# --- prompt bytes ---------------------------------------------------------------------------


class CountingTokenizer:
    """The fake engine's tokenizer, counting the texts it is asked to encode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encoded = 0

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.encoded += 1
        return self.inner(text, *args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.encoded += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", lambda text: {"model": BASE_ID, "prompt": text}),
        ("/v1/completions", lambda text: {"model": BASE_ID, "prompt": ["hi", text]}),
        (
            "/v1/chat/completions",
            lambda text: {"model": BASE_ID, "messages": [{"role": "user", "content": text}]},
        ),
        (
            "/v1/chat/completions",
            lambda text: {
                "model": BASE_ID,
                "messages": [
                    {"role": "system", "content": text[: len(text) // 2]},
                    {"role": "user", "content": [{"type": "text", "text": text}]},
                ],
            },
        ),
    ],
)
def test_text_longer_than_the_context_can_hold_is_refused_untokenized(path: str, body: Any) -> None:
    """The bound is max_model_len x the most bytes one token can stand for: past it the
    prompt cannot fit whatever it tokenizes to, so the tokenizer never sees it."""
    engine = FakeEngine(max_model_len=64)
    app = create_app(engine)
    service = app.state.service
    counting = CountingTokenizer(engine.tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeEngine, "tokenizer", property(lambda self: counting))
        with TestClient(app, raise_server_exceptions=False) as client:
            client.post("/v1/completions", json={"model": BASE_ID, "prompt": "warm"})
            bound = engine.max_model_len * service._max_token_bytes
            counting.encoded = 0
            response = client.post(path, json=body("é" * (bound // 2 + 1)))
    assert response.status_code == 400, response.text
    error = assert_error_envelope(response.json(), status=400)
    assert error["code"] == "context_length_exceeded", error
    assert str(bound) in error["message"]
    assert counting.encoded == 0
    assert len(engine.calls) == 1  # the warm-up request only


# --- the event loop stays free --------------------------------------------------------------


class HealthProbe:
    """Polls `/health` from its own thread while it runs; records every latency."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


HEALTH_DEADLINE_S = 2.0


def _heavy_requests() -> list[tuple[str, str, dict[str, Any] | None, bytes | None, int]]:
    """(name, path, json, raw body, expected status): each costs the server seconds of CPU."""
    text = "the quick brown fox jumps over the lazy dog " * 50_000  # 2.2 MB: seconds to tokenize
    # Just under json_limits.MAX_VALUES: 3 MB of token ids to parse, check and validate.
    token_ids = json.dumps({"model": BASE_ID, "prompt": [7] * 1_000_000}).encode()
    return [
        ("2 MB prompt", "/v1/completions", {"model": BASE_ID, "prompt": text}, None, 200),
        (
            "2 MB chat message",
            "/v1/chat/completions",
            {"model": BASE_ID, "messages": [{"role": "user", "content": text}]},
            None,
            200,
        ),
        ("a million token ids", "/v1/completions", None, token_ids, 200),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _heavy_requests()])
def test_health_answers_while_a_heavy_request_runs(case: str) -> None:
    """Tokenizing, rendering templates and parsing large bodies run in worker threads: a
    client's `/health` keeps answering within the deadline while each one runs. The context
    is made huge so that the byte bound lets the text through to the tokenizer."""
    name, path, body, raw, status = next(c for c in _heavy_requests() if c[0] == case)
    app = create_app(FakeEngine(max_model_len=100_000_000), max_request_bytes=32 * 1024**2)
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/completions", json={"model": BASE_ID, "prompt": "warm"})
        with HealthProbe(url) as probe:
            time.sleep(0.2)
            started = time.perf_counter()
            if raw is not None:
                response = client.post(
                    path, content=raw, headers={"content-type": "application/json"}
                )
            else:
                response = client.post(path, json=body)
            took = time.perf_counter() - started
            time.sleep(0.2)
    assert response.status_code == status, response.text[:300]
    # The probe ran throughout: several answers while the request was being worked on.
    assert took > 0.25, f"{name} took only {took:.2f} s: not heavy enough to prove anything"
    assert len(probe.latencies) >= 5
    assert max(probe.latencies) < HEALTH_DEADLINE_S, (name, max(probe.latencies))


def test_health_answers_during_heavy_uploads(
    tmp_path: Path, tiny_base: Path, base_spec: Any, tiny_adapters: dict[str, Path]
) -> None:
    """The registry and fine-tuning uploads: hashing, safetensors checks, the adapter's
    patterns (a backtracking one, matched by RE2) and a 24 MB training file checked line by
    line all run off the loop."""
    built = build_full_app(tmp_path, tiny_base, base_spec, max_upload_bytes=64 * 1024**2)
    config = json.loads((tiny_adapters["r4"] / "adapter_config.json").read_text())
    config["exclude_modules"] = "model(.|.)*Z" + "." * 40
    files = [
        ("files", ("adapter_config.json", json.dumps(config).encode())),
        (
            "files",
            (
                "adapter_model.safetensors",
                (tiny_adapters["r4"] / "adapter_model.safetensors").read_bytes(),
            ),
        ),
    ]
    training = jsonl(TRAIN_LINES * 120_000)
    assert len(training) > 20_000_000
    try:
        with (
            serve(built.app) as url,
            httpx.Client(base_url=url, timeout=300) as client,
            HealthProbe(url) as probe,
        ):
            time.sleep(0.2)
            adapter = client.post("/v1/adapters", data={"name": "backtracking"}, files=files)
            uploaded = client.post(
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": ("train.jsonl", training)},
            )
            time.sleep(0.2)
    finally:
        built.fine_tuning.stop()
        built.registry.close()
    assert adapter.status_code == 201, adapter.text
    assert uploaded.status_code == 200, uploaded.text
    assert len(probe.latencies) >= 5
    assert max(probe.latencies) < HEALTH_DEADLINE_S, max(probe.latencies)
