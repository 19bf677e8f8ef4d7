"""Which output constraint a request asks for: OpenAI's `response_format` or vLLM's
`structured_outputs` extension, as a `GrammarSpec` plus the field that holds it (the
`param` of a 400 when the grammar engine refuses it)."""

from __future__ import annotations

import json

from adapterhub_server.engine.structured import GrammarSpec
from client.types import ChatCompletionRequest, CompletionRequest


def requested_grammar(
    request: CompletionRequest | ChatCompletionRequest,
) -> tuple[GrammarSpec, str] | None:
    """The constraint and its field, or None for free text (`{"type": "text"}` or neither).

    The request schema already refused both fields together and anything but exactly one
    key of `structured_outputs`.
    """
    so = request.structured_outputs
    if so is not None:
        if so.regex is not None:
            return GrammarSpec("regex", so.regex), "structured_outputs.regex"
        if so.choice is not None:
            return GrammarSpec("choice", json.dumps(so.choice)), "structured_outputs.choice"
        if so.grammar is not None:
            return GrammarSpec("grammar", so.grammar), "structured_outputs.grammar"
        if so.json_ is not None:
            return GrammarSpec("json_schema", json.dumps(so.json_)), "structured_outputs.json"
    rf = request.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec("json_object"), "response_format"
    assert rf.json_schema is not None  # the schema requires it for type json_schema
    if rf.json_schema.schema_ is None:
        # OpenAI's shape allows a json_schema without a schema: any JSON object then.
        return GrammarSpec("json_object"), "response_format.json_schema"
    schema = json.dumps(rf.json_schema.schema_)
    return GrammarSpec("json_schema", schema), "response_format.json_schema.schema"
