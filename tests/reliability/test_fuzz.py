"""Schema-driven fuzzing of every route of the app's own OpenAPI document (schemathesis).

The app runs in-process (ASGI) over the fake engine, a real registry and a real fine-tuning
service whose runner is not started. For every operation, valid (positive) and invalid
(negative) requests are generated, once with random path parameters and once with the ids of
resources that exist, so that the handlers behind the 404s run too. Every response must:

- never be a 5xx (a client cannot cause a server fault);
- when not 2xx, carry the error envelope `{"error": {"message", "type", "param", "code"}}`;
- conform to the response schema the document declares for it;
- reject (4xx) what the schema says is invalid.

The run is bounded and derandomized so that CI sees the same examples every time.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from client.types import FineTuningJobCreateRequest
from tests.finetune.conftest import jsonl
from tests.reliability.conftest import FullApp, assert_error_envelope, build_full_app

# Small per operation and mode: 22+ operations x 2 modes x 2 path variants stay fast on two
# shared cores, and derandomize makes every run replay the same examples.
EXAMPLES = 25
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Routes the document must contain: if a router stops being mounted, the fuzz would
# silently cover less, so this fails instead.
REQUIRED_OPERATIONS = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/adapters"),
    ("POST", "/v1/adapters"),
    ("GET", "/v1/adapters/{name}"),
    ("GET", "/v1/adapters/{name}/versions/{version}"),
    ("DELETE", "/v1/adapters/{name}/versions/{version}"),
    ("GET", "/v1/adapters/{name}/versions/{version}/files/{filename}"),
    ("PUT", "/v1/adapters/{name}/aliases/{alias}"),
    ("DELETE", "/v1/adapters/{name}/aliases/{alias}"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
}

CHECKS = [
    not_a_server_error,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    base_spec: Any,
    tiny_adapters: dict[str, Path],
) -> Iterator[tuple[FullApp, dict[str, str]]]:
    """The app, seeded with one adapter (with an alias), one training file and one job;
    returns the ids that name them in paths."""
    built = build_full_app(tmp_path_factory.mktemp("fuzz"), tiny_base, base_spec)
    built.registry.push(tiny_adapters["r4"], "seeded", alias="prod")

    async def seed_jobs() -> tuple[str, str]:
        service = built.fine_tuning
        file = await service.upload_file(
            filename="train.jsonl", data=io.BytesIO(jsonl()), purpose="fine-tune"
        )
        job = await service.create_job(
            FineTuningJobCreateRequest(
                model=built.engine.base_model_id, training_file=file.id, suffix="seeded-job"
            )
        )
        return file.id, job.id

    file_id, job_id = anyio.run(seed_jobs)
    known = {
        "name": "seeded",
        "version": "1",
        "alias": "prod",
        "filename": "adapter_model.safetensors",
        "file_id": file_id,
        "job_id": job_id,
    }
    yield built, known
    built.fine_tuning.stop()
    built.registry.close()


def _operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Destructive operations last, so that the reads see the seeded resources first.
    return sorted(operations, key=lambda op: op.method.upper() == "DELETE")


def _check(case: Any, mode: GenerationMode) -> None:
    response = case.call()
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    case.validate_response(response, checks=checks)
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(
                f"{case.method} {case.formatted_path} -> {response.status_code}, not JSON: "
                f"{response.content[:200]!r}"
            ) from None
        assert_error_envelope(body, status=response.status_code)


def _fuzz(operation: Any, mode: GenerationMode, path_parameters: dict[str, Any] | None) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case: Any) -> None:
        _check(case, mode)

    run()


def test_every_route_is_in_the_document(fuzzed: tuple[FullApp, dict[str, str]]) -> None:
    built, _ = fuzzed
    found = {(op.method.upper(), op.path) for op in _operations(built.app)}
    assert found >= REQUIRED_OPERATIONS, REQUIRED_OPERATIONS - found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(fuzzed: tuple[FullApp, dict[str, str]], mode: GenerationMode) -> None:
    built, known = fuzzed
    failures: list[str] = []
    for operation in _operations(built.app):
        names = {p.name for p in operation.path_parameters}
        variants: list[dict[str, Any] | None] = [None]
        if names and mode is GenerationMode.POSITIVE:
            # Existing resources: the handlers past the lookup run (downloads, deletes...).
            variants.append({n: known[n] for n in names if n in known})
        for pinned in variants:
            try:
                _fuzz(operation, mode, pinned)
            except Unsatisfiable:
                # Nothing in this operation can be made invalid (no body, only string path
                # parameters): there is no negative request to send.
                assert mode is GenerationMode.NEGATIVE, operation.path
            except Exception as exc:  # collected, so one run reports every broken route
                failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)


# Bodies no schema describes: random bytes under each content type a client might claim.
RAW_CONTENT_TYPES = [
    "application/json",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "application/x-www-form-urlencoded",
    "text/plain",
]


def test_raw_bodies_never_cause_a_server_error(fuzzed: tuple[FullApp, dict[str, str]]) -> None:
    """Arbitrary bytes (truncated JSON, broken multipart) sent to every write route: 4xx with
    the envelope, never 5xx."""
    built, known = fuzzed
    writes = [
        op.path.format(**known)
        for op in _operations(built.app)
        if op.method.upper() in ("POST", "PUT")
    ]
    bodies = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        # Near misses: valid JSON cut short, or multipart with a part that never ends.
        st.sampled_from(
            [
                b'{"model": "tiny-base", "prompt": "hi"',
                b'{"model": "tiny-base", "messages": [{"role": "user"',
                b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nx',
                b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n',
                b"--xyz--\r\n",
                b"[]",
                b"null",
                b'"text"',
                b"\xff\xfe\x00",
            ]
        ),
    )

    with TestClient(built.app, raise_server_exceptions=False) as client:

        @FUZZ_SETTINGS
        @given(path=st.sampled_from(writes), body=bodies, ctype=st.sampled_from(RAW_CONTENT_TYPES))
        def run(path: str, body: bytes, ctype: str) -> None:
            method = "PUT" if "/aliases/" in path else "POST"
            response = client.request(method, path, content=body, headers={"content-type": ctype})
            assert response.status_code < 500, (path, ctype, body, response.text)
            if response.status_code >= 400:
                assert_error_envelope(response.json(), status=response.status_code)

        run()


def test_the_fuzz_detects_a_route_that_breaks_the_envelope(
    fuzzed: tuple[FullApp, dict[str, str]],
) -> None:
    """The harness itself can fail: a route answering a bare 500 is reported."""
    built, _ = fuzzed
    operations = {op.path: op for op in _operations(built.app)}
    service = built.app.state.service

    def crash() -> Any:
        raise RuntimeError("boom")

    def plain_text_error() -> Any:
        return PlainTextResponse("nope", status_code=400)

    for method, broken, expected in (
        ("health", crash, "Server error"),
        ("list_models", plain_text_error, "not JSON"),
    ):
        path = "/health" if method == "health" else "/v1/models"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(service, method, broken)
            with pytest.raises(BaseException) as caught:
                _fuzz(operations[path], GenerationMode.POSITIVE, None)
        assert expected in repr(caught.value) + str(caught.value), caught.value


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # 2**63 fits the JSON limits (64 bits, unsigned) but not SQLite's signed integer.
        ("PUT", "/v1/adapters/seeded/aliases/prod", {"version": 2**63}),
        ("DELETE", f"/v1/adapters/seeded/versions/{2**64}", None),
        ("GET", f"/v1/adapters/seeded/versions/{2**64}/files/adapter_model.safetensors", None),
    ],
)
def test_version_numbers_past_64_bits_are_a_400(
    fuzzed: tuple[FullApp, dict[str, str]], method: str, path: str, body: Any
) -> None:
    """Found by this fuzz: an integer version the SQLite driver cannot bind was a 500."""
    built, _ = fuzzed
    with TestClient(built.app, raise_server_exceptions=False) as client:
        response = client.request(method, path, json=body)
    assert response.status_code == 400, response.text
    error = assert_error_envelope(response.json(), status=400)
    assert error["param"] == "version"
