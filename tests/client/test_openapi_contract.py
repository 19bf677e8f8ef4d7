"""The client's wire models are the server's: checked against the server's OpenAPI document.

Every client method is called against a transport that records the request; the request is
matched to an operation of the OpenAPI document of the real app, and then:
- the operation's response schema is the model the method is annotated to return (same name,
  same JSON schema);
- a JSON body is the operation's request model, and every field the client sends is one of
  its properties; multipart fields are the form's fields.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

import client.types as wire
from adapterhub_server.api import create_app
from client import AdapterHubClient
from client.resources.adapters import ADAPTER_FILES
from tests.api.fake_engine import FakeEngine


class _Recorded(Exception):
    """Stops a call once its first request is recorded."""


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    # Services are never called while the schema is generated; the routes only need them
    # to be present.
    app = create_app(FakeEngine(), adapters=object(), fine_tuning=object())  # type: ignore[arg-type]
    return app.openapi()


def _strip_null_defaults(value: Any) -> Any:
    """FastAPI leaves `"default": null` out of the component schemas; pydantic writes it."""
    if isinstance(value, dict):
        return {
            k: _strip_null_defaults(v)
            for k, v in value.items()
            if not (k == "default" and v is None)
        }
    if isinstance(value, list):
        return [_strip_null_defaults(v) for v in value]
    return value


def _client_schemas(model: type[pydantic.BaseModel]) -> list[dict[str, Any]]:
    """The model's schema and those of the models it nests, in both modes."""
    out = []
    for mode in ("serialization", "validation"):
        schema = model.model_json_schema(mode=mode, ref_template="#/components/schemas/{model}")
        defs = schema.pop("$defs", {})
        out.append({model.__name__: schema, **defs})
    return [_strip_null_defaults(s) for s in out]


def _assert_same_schema(model: type[pydantic.BaseModel], components: dict[str, Any]) -> None:
    candidates = _client_schemas(model)
    for name in candidates[0]:
        assert name in components, f"{name} (nested in {model.__name__}) is not in the doc"
        assert any(c.get(name) == components[name] for c in candidates), (
            f"{name}: the client's JSON schema differs from the server's"
        )


def _match(openapi: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, operations in openapi["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path} is not an operation of the server's OpenAPI doc")


def _response_ref(operation: dict[str, Any]) -> str | None:
    for status, response in operation["responses"].items():
        if status.startswith("2"):
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            return str(schema["$ref"]).rsplit("/", 1)[-1] if "$ref" in schema else None
    raise AssertionError(f"no 2xx response in {operation.get('operationId')}")


def _returned_model(method: Callable[..., Any]) -> type[pydantic.BaseModel] | None:
    """The pydantic model a client method is annotated to return (a stream's alternative
    and composite results are ignored)."""
    hint = typing.get_type_hints(method)["return"]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    models = [m for m in members if isinstance(m, type) and issubclass(m, pydantic.BaseModel)]
    return models[0] if len(models) == 1 else None


def _form_fields(request: httpx.Request) -> set[str]:
    return set(re.findall(rb'Content-Disposition: form-data; name="([^"]+)"', request.content))


def _adapter_dir(tmp: Path) -> Path:
    for name in ADAPTER_FILES:
        (tmp / name).write_bytes(b"{}")
    return tmp


CHAT = [{"role": "user", "content": "hi"}]


class _Reply(pydantic.BaseModel):
    answer: str


# (label, how to call it, the method whose return annotation names the response model)
CALLS: list[tuple[str, Callable[[AdapterHubClient, Path], Any], Callable[[AdapterHubClient], Any]]]
CALLS = [
    ("health", lambda c, _: c.health(), lambda c: c.health),
    ("models.list", lambda c, _: c.models.list(), lambda c: c.models.list),
    (
        "completions.create",
        lambda c, _: c.completions.create(model="m", prompt="p", max_tokens=2, top_k=3),
        lambda c: c.completions.create,
    ),
    (
        "completions.create stream",
        lambda c, _: c.completions.create(model="m", prompt="p", stream=True),
        lambda c: c.completions.create,
    ),
    (
        "chat.completions.create",
        lambda c, _: c.chat.completions.create(
            model="m", messages=CHAT, max_completion_tokens=3, logprobs=True, top_logprobs=1
        ),
        lambda c: c.chat.completions.create,
    ),
    (
        "chat.completions.create with tools",
        lambda c, _: c.chat.completions.create(
            model="m",
            messages=[
                *CHAT,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "f"}},
            parallel_tool_calls=False,
            response_format=wire.ResponseFormat(
                type="json_schema",
                json_schema=wire.JsonSchemaFormat(name="x", schema={"type": "object"}),
            ),
            chat_template_kwargs={"enable_thinking": False},
            metadata={"k": "v"},
            store=False,
            service_tier="auto",
            user="u",
            prompt_cache_key="p",
            safety_identifier="s",
        ),
        lambda c: c.chat.completions.create,
    ),
    (
        "chat.completions.parse",
        lambda c, _: c.chat.completions.parse(model="m", messages=CHAT, response_format=_Reply),
        lambda c: c.chat.completions.parse,
    ),
    (
        "completions.create structured",
        lambda c, _: c.completions.create(
            model="m",
            prompt="p",
            echo=True,
            prompt_logprobs=1,
            structured_outputs=wire.StructuredOutputs(json={"type": "object"}),
        ),
        lambda c: c.completions.create,
    ),
    (
        "tokenize",
        lambda c, _: c.tokenize(model="m", messages=CHAT, return_token_strs=True),
        lambda c: c.tokenize,
    ),
    ("detokenize", lambda c, _: c.detokenize(model="m", tokens=[1, 2]), lambda c: c.detokenize),
    (
        "adapters.upload",
        lambda c, tmp: c.adapters.upload(
            _adapter_dir(tmp), name="a", alias="prod", description="d", metadata={"k": 1}
        ),
        lambda c: c.adapters.upload,
    ),
    ("adapters.list", lambda c, _: c.adapters.list(), lambda c: c.adapters.list),
    ("adapters.get", lambda c, _: c.adapters.get("a"), lambda c: c.adapters.get),
    (
        "adapters.get_version",
        lambda c, _: c.adapters.get_version("a", 2),
        lambda c: c.adapters.get_version,
    ),
    ("adapters.resolve", lambda c, _: c.adapters.resolve("a@3"), lambda c: c.adapters.resolve),
    (
        "adapters.delete",
        lambda c, _: c.adapters.delete("a", 1, force=True),
        lambda c: c.adapters.delete,
    ),
    (
        "adapters.set_alias",
        lambda c, _: c.adapters.set_alias("a", "prod", 1),
        lambda c: c.adapters.set_alias,
    ),
    (
        "adapters.delete_alias",
        lambda c, _: c.adapters.delete_alias("a", "prod"),
        lambda c: c.adapters.delete_alias,
    ),
    ("files.create", lambda c, _: c.files.create([{"a": 1}]), lambda c: c.files.create),
    ("files.list", lambda c, _: c.files.list(), lambda c: c.files.list),
    ("files.retrieve", lambda c, _: c.files.retrieve("file-1"), lambda c: c.files.retrieve),
    ("files.content", lambda c, _: c.files.content("file-1"), lambda c: c.files.content),
    ("files.delete", lambda c, _: c.files.delete("file-1"), lambda c: c.files.delete),
    (
        "fine_tuning.jobs.create",
        lambda c, _: c.fine_tuning.jobs.create(
            training_file="file-1",
            model="m",
            suffix="s",
            validation_file="file-2",
            seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        ),
        lambda c: c.fine_tuning.jobs.create,
    ),
    (
        "fine_tuning.jobs.list",
        lambda c, _: c.fine_tuning.jobs.list(after="ftjob-1", limit=5),
        lambda c: c.fine_tuning.jobs.list,
    ),
    (
        "fine_tuning.jobs.retrieve",
        lambda c, _: c.fine_tuning.jobs.retrieve("ftjob-1"),
        lambda c: c.fine_tuning.jobs.retrieve,
    ),
    (
        "fine_tuning.jobs.events",
        lambda c, _: c.fine_tuning.jobs.events("ftjob-1", limit=5),
        lambda c: c.fine_tuning.jobs.events,
    ),
    (
        "fine_tuning.jobs.cancel",
        lambda c, _: c.fine_tuning.jobs.cancel("ftjob-1"),
        lambda c: c.fine_tuning.jobs.cancel,
    ),
    (
        "fine_tuning.jobs.wait",
        lambda c, _: c.fine_tuning.jobs.wait("ftjob-1"),
        lambda c: c.fine_tuning.jobs.wait,
    ),
]


@pytest.mark.parametrize(("label", "call", "method"), CALLS, ids=[c[0] for c in CALLS])
def test_each_call_matches_an_operation_and_its_schemas(
    openapi: dict[str, Any],
    tmp_path: Path,
    label: str,
    call: Callable[[AdapterHubClient, Path], Any],
    method: Callable[[AdapterHubClient], Any],
) -> None:
    recorded: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        recorded.append(request)
        raise _Recorded

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with AdapterHubClient(base_url="http://hub", http_client=http, max_retries=0) as hub:
        with pytest.raises(_Recorded):
            call(hub, tmp_path)
        returned = _returned_model(method(hub))
    (request,) = recorded
    _, operation = _match(openapi, request.method, request.url.path)
    components = openapi["components"]["schemas"]

    if label == "files.content":
        assert returned is None and _response_ref(operation) is None  # raw bytes
    elif label == "chat.completions.parse":
        # A ChatCompletion whose messages gain the client-side `parsed`.
        assert returned is not None and issubclass(returned, wire.ChatCompletion)
        assert _response_ref(operation) == "ChatCompletion"
        body = httpx.Response(200, content=request.content).json()
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {
                "name": "_Reply",
                "schema": _Reply.model_json_schema(),
                "strict": True,
            },
        }
    else:
        assert returned is not None, label
        assert _response_ref(operation) == returned.__name__, label
        _assert_same_schema(returned, components)

    body = operation.get("requestBody", {}).get("content", {})
    if request.headers.get("content-type", "").startswith("application/json"):
        ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        model = getattr(wire, ref)  # the server's request model is the client's
        _assert_same_schema(model, components)
        sent = set(httpx.Response(200, content=request.content).json())
        assert sent <= set(components[ref]["properties"]), (label, sent)
    elif request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = components[body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]]
        sent = {name.decode() for name in _form_fields(request)}
        assert sent <= set(form["properties"]), (label, sent)
        assert set(form["required"]) <= sent, (label, sent)
    else:
        assert not request.content, label


def test_every_wire_model_in_the_doc_is_the_clients(openapi: dict[str, Any]) -> None:
    components = openapi["components"]["schemas"]
    shared = [n for n in components if isinstance(getattr(wire, n, None), type)]
    assert len(shared) >= 40
    for name in shared:
        _assert_same_schema(getattr(wire, name), components)


@pytest.mark.parametrize(
    ("method", "model", "client_only"),
    [
        (lambda c: c.completions.create, wire.CompletionRequest, {"extra_body"}),
        (lambda c: c.chat.completions.create, wire.ChatCompletionRequest, {"extra_body"}),
        (lambda c: c.fine_tuning.jobs.create, wire.FineTuningJobCreateRequest, {"extra_body"}),
        (lambda c: c.tokenize, wire.TokenizeRequest, set()),
        (lambda c: c.detokenize, wire.DetokenizeRequest, set()),
    ],
    ids=["completions", "chat", "jobs", "tokenize", "detokenize"],
)
def test_create_arguments_mirror_the_request_model(
    method: Callable[[AdapterHubClient], Any],
    model: type[pydantic.BaseModel],
    client_only: set[str],
) -> None:
    """Every field the server accepts is a keyword argument, and nothing else is."""
    import inspect

    with AdapterHubClient(base_url="http://hub") as hub:
        signature = inspect.signature(method(hub))
    params = signature.parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert set(params) - client_only == set(model.model_fields)


def test_parse_arguments_are_creates_without_streaming() -> None:
    import inspect

    with AdapterHubClient(base_url="http://hub") as hub:
        create = set(inspect.signature(hub.chat.completions.create).parameters)
        parse = set(inspect.signature(hub.chat.completions.parse).parameters)
    assert parse == create - {"stream", "stream_options"}
