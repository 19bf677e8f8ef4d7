"""Render a chat request (messages, tools, tool history) into prompt tokens with the model's
own chat template, and say how its output is to be parsed.

Templates differ in what they understand, so each tokenizer's template is probed once
(`chat_template_traits`) by rendering sample conversations and looking for them in the text:

- a template that renders `tools` gets them (HF convention: the OpenAI tool dicts);
  one that does not (SmolLM2's plain ChatML) gets a Hermes-style tools block appended to the
  system turn (a system turn is inserted where there is none), and the `hermes` parser;
- a template that renders assistant `tool_calls` and `tool` messages gets them in the HF
  convention (`function.arguments` as a dict, not the OpenAI JSON string); one that does not
  gets them as Hermes text: `<tool_call>...</tool_call>` in the assistant's content, tool
  results as a user turn of `<tool_response>...</tool_response>` blocks (consecutive results
  share one turn, as Qwen2.5's template writes them).

Rendering is CPU work: call `render_conversation` in a worker thread.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import string
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from adapterhub_server.api.reasoning import prompt_opens_reasoning, template_marks_reasoning
from adapterhub_server.api.tools.parsers import TOOL_PARSERS
from adapterhub_server.api.tools.validation import resolve_tool_choice
from adapterhub_server.errors import InvalidRequestError

__all__ = [
    "ChatTemplateTraits",
    "RenderedChat",
    "chat_template_traits",
    "detect_tool_parser",
    "hermes_tools_block",
    "render_conversation",
]


@dataclass(frozen=True)
class ChatTemplateTraits:
    """What a tokenizer's chat template does with tools, found by rendering probes."""

    renders_tools: bool
    """`apply_chat_template(..., tools=...)` puts the tools into the prompt."""
    renders_tool_history: bool
    """Assistant `tool_calls` and `tool` messages come out in the prompt."""
    tool_parser: str
    """The output convention the template teaches (a `TOOL_PARSERS` key)."""
    reasoning: bool
    """The template uses `<think>...</think>` reasoning blocks."""


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat prompt and how to read the model's answer to it."""

    token_ids: list[int]
    prompt: str
    """The rendered text `token_ids` encode."""
    tool_parser: str | None
    """The parser for the output (`make_tool_parser`), when the model may call a tool on its
    own (tool_choice "auto" with tools); None for "none" and for forced choices, whose
    output is read with `forcing.calls_from_forced_output`."""
    reasoning: bool
    """Split reasoning from the output (`ReasoningParser`)."""
    starts_in_reasoning: bool
    """The prompt ends inside an open think block (`ReasoningParser(starts_in_reasoning=)`)."""


def render_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    tool_call_parser: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    add_generation_prompt: bool = True,
) -> RenderedChat:
    """Render OpenAI chat messages with the tokenizer's chat template and tokenize them.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: OpenAI wire message dicts: `role` (developer is rendered as system),
            `content` (a string, a list of text parts, or null for an assistant message with
            `tool_calls`), assistant `tool_calls` (`function.arguments` a JSON string) and
            `tool` messages with `tool_call_id`.
        tools: OpenAI tool dicts, already checked by `validate_tools`.
        tool_choice: as in the request; with "none" the tools are left out of the prompt.
        tool_call_parser: `--tool-call-parser`: "auto" (from the template; `hermes` when
            the tools block was added here) or a `TOOL_PARSERS` key, used as given.
        chat_template_kwargs: extra template variables (`{"enable_thinking": false}`).
        add_generation_prompt: end with the assistant turn's header (what chat sends);
            false renders the conversation as it stands (`/tokenize` offers both).

    Raises:
        InvalidRequestError: no chat template, a `tool_calls` entry whose arguments are not
            JSON, content of the wrong type, reserved `chat_template_kwargs`, or a template
            that refuses the conversation (roles out of order, ...).
        ValueError: an unknown `tool_call_parser` (a configuration error).
    """
    if tool_call_parser != "auto" and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {tool_call_parser!r}")
    traits = chat_template_traits(tokenizer)
    choice = resolve_tool_choice(tools, tool_choice)
    show_tools = bool(tools) and choice.mode != "none"
    conversation = _conversation(messages, traits)
    template_tools = [dict(t) for t in tools] if show_tools and tools else None
    if template_tools and not traits.renders_tools:
        _add_system_text(conversation, hermes_tools_block(template_tools))
        template_tools = None
    kwargs = _template_kwargs(tokenizer, chat_template_kwargs)
    prompt = _render(
        tokenizer, conversation, template_tools, kwargs, generation_prompt=add_generation_prompt
    )
    token_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    parser = None
    if show_tools and choice.mode == "auto":
        if tool_call_parser != "auto":
            parser = tool_call_parser
        else:
            parser = traits.tool_parser if traits.renders_tools else "hermes"
    starts_in_reasoning = False
    if traits.reasoning and add_generation_prompt:
        without = _render(tokenizer, conversation, template_tools, kwargs, generation_prompt=False)
        generation_prompt = prompt[len(without) :] if prompt.startswith(without) else prompt
        starts_in_reasoning = prompt_opens_reasoning(generation_prompt)
    return RenderedChat(
        token_ids=token_ids,
        prompt=prompt,
        tool_parser=parser,
        reasoning=traits.reasoning,
        starts_in_reasoning=starts_in_reasoning,
    )


def hermes_tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools section Qwen2.5's template writes into the system turn (Hermes format)."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def detect_tool_parser(template_source: str) -> str:
    """The tool-call convention a chat template's source teaches; `hermes` when none shows."""
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or (
        '"parameters"' in template_source and "<|start_header_id|>" in template_source
    ):
        return "llama3_json"
    return "hermes"


_PROBE_NAME = "adapterhub_probe_function"
_PROBE_ARGUMENT = "adapterhub_probe_argument_value"
_PROBE_RESULT = "adapterhub_probe_tool_result"
_PROBE_CALL_ID = "prb0c4ll1"  # 9 alphanumerics: Mistral's templates refuse other ids
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_NAME,
            "description": "Probe.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
_PROBE_USER = {"role": "user", "content": "Hello."}

_traits_cache: weakref.WeakKeyDictionary[Any, tuple[str, ChatTemplateTraits]] = (
    weakref.WeakKeyDictionary()
)
_traits_lock = threading.Lock()


def chat_template_traits(tokenizer: Any) -> ChatTemplateTraits:
    """The traits of the tokenizer's chat template, probed once per tokenizer and template.

    Raises:
        InvalidRequestError: the tokenizer has no chat template.
    """
    try:
        source = tokenizer.get_chat_template(None, tools=_PROBE_TOOLS)
    except ValueError:
        raise InvalidRequestError(
            "the base model has no chat template; use /v1/completions", param="messages"
        ) from None
    with _traits_lock:
        cached = _traits_cache.get(tokenizer)
    if cached is not None and cached[0] == source:
        return cached[1]
    traits = _probe(tokenizer, source)
    with _traits_lock:
        _traits_cache[tokenizer] = (source, traits)
    return traits


def _probe(tokenizer: Any, source: str) -> ChatTemplateTraits:
    with_tools = _try_render(tokenizer, [_PROBE_USER], _PROBE_TOOLS)
    history = [
        _PROBE_USER,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": _PROBE_CALL_ID,
                    "type": "function",
                    "function": {"name": _PROBE_NAME, "arguments": {"q": _PROBE_ARGUMENT}},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": _PROBE_CALL_ID,
            "name": _PROBE_NAME,
            "content": _PROBE_RESULT,
        },
    ]
    with_history = _try_render(tokenizer, history, None)
    return ChatTemplateTraits(
        renders_tools=_PROBE_NAME in with_tools,
        renders_tool_history=all(
            s in with_history for s in (_PROBE_NAME, _PROBE_ARGUMENT, _PROBE_RESULT)
        ),
        tool_parser=detect_tool_parser(source),
        reasoning=template_marks_reasoning(source),
    )


def _try_render(tokenizer: Any, conversation: list[dict[str, Any]], tools: Any) -> str:
    """The rendering, or "" when the template cannot render the conversation."""
    try:
        return tokenizer.apply_chat_template(
            conversation, tools=tools, tokenize=False, add_generation_prompt=True
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return ""


def _render(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    *,
    generation_prompt: bool,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **kwargs,
        )
    except (TemplateError, ValueError, TypeError) as exc:
        # Templates refuse conversations they cannot render (roles out of order, ...).
        raise InvalidRequestError(f"cannot render messages: {exc}", param="messages") from exc


def _template_kwargs(tokenizer: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """`chat_template_kwargs`, refusing names that would replace the renderer's own."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise InvalidRequestError(
            "chat_template_kwargs must be an object", param="chat_template_kwargs"
        )
    reserved = (
        set(inspect.signature(tokenizer.apply_chat_template).parameters)
        | {"messages", "tools", "documents", "add_generation_prompt"}
        | set(getattr(tokenizer, "special_tokens_map", {}))
    )
    for key in extra:
        if not isinstance(key, str) or not key.isidentifier() or key in reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs cannot set {str(key)[:40]!r}",
                param=f"chat_template_kwargs.{str(key)[:40]}",
            )
    return dict(extra)


def _add_system_text(conversation: list[dict[str, Any]], text: str) -> None:
    """Append `text` to the leading system turn, inserting one where there is none."""
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        content = first.get("content") or ""
        conversation[0] = {**first, "content": f"{content}\n\n{text}" if content else text}
    else:
        conversation.insert(0, {"role": "system", "content": text})


def _conversation(
    messages: Sequence[Mapping[str, Any]], traits: ChatTemplateTraits
) -> list[dict[str, Any]]:
    """The wire messages as the template expects them (see the module docstring)."""
    mistral_ids = traits.tool_parser == "mistral"
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    tool_turn_open = False  # the last entry of `out` is a Hermes tool-response user turn
    for i, message in enumerate(messages):
        role = message.get("role")
        role = "system" if role == "developer" else role
        calls = message.get("tool_calls") if role == "assistant" else None
        content = _content(message.get("content"), i, optional=role == "assistant")
        entry: dict[str, Any]
        if role == "assistant" and calls:
            parsed = _history_calls(calls, i)
            call_names.update((c["id"], c["function"]["name"]) for c in parsed if "id" in c)
            if traits.renders_tool_history and mistral_ids:
                for call in parsed:
                    call["id"] = _mistral_id(call.get("id"))
            if traits.renders_tool_history:
                entry = {"role": role, "content": content, "tool_calls": parsed}
            else:
                entry = {"role": role, "content": _hermes_calls_text(content, parsed)}
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not traits.renders_tool_history:
                block = f"<tool_response>\n{content}\n</tool_response>"
                if tool_turn_open:
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block})
                    tool_turn_open = True
                continue
            entry = {"role": role, "content": content}
            if isinstance(call_id, str):
                entry["tool_call_id"] = _mistral_id(call_id) if mistral_ids else call_id
            name = message.get("name") or call_names.get(call_id or "")
            if name:
                entry["name"] = name
        else:
            entry = {"role": role, "content": "" if content is None else content}
            if isinstance(message.get("name"), str):
                entry["name"] = message["name"]
        if role == "assistant" and isinstance(message.get("reasoning_content"), str):
            entry["reasoning_content"] = message["reasoning_content"]
        tool_turn_open = False
        out.append(entry)
    return out


def _content(content: Any, index: int, *, optional: bool) -> str | None:
    """A message's text: a string, or the text parts joined by newlines."""
    if content is None:
        if optional:
            return None
        raise InvalidRequestError("this message needs content", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for k, part in enumerate(content):
            if not (
                isinstance(part, Mapping)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(
                    "only text content parts can be rendered",
                    param=f"messages[{index}].content[{k}]",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(
        "content must be a string or an array of text parts", param=f"messages[{index}].content"
    )


def _history_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` in the HF convention (arguments decoded)."""
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                f"{where}.function.name must be a string", param=f"{where}.function.name"
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InvalidRequestError(
                    f"{where}.function.arguments is not valid JSON",
                    param=f"{where}.function.arguments",
                ) from None
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": {} if arguments is None else arguments},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _hermes_calls_text(content: str | None, calls: list[dict[str, Any]]) -> str:
    """An assistant turn's content with its calls written as Hermes blocks."""
    blocks = [
        "<tool_call>\n"
        + json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
            ensure_ascii=False,
        )
        + "\n</tool_call>"
        for c in calls
    ]
    return "\n".join(([content] if content else []) + blocks)


_ALNUM = re.compile(r"[^A-Za-z0-9]")
_ID_ALPHABET = string.ascii_letters + string.digits


def _mistral_id(call_id: str | None) -> str:
    """A 9-alphanumeric id, as Mistral's templates demand, derived from `call_id` (the same
    id gives the same result, so a call and its result still match)."""
    if not call_id:
        call_id = ""
    alnum = _ALNUM.sub("", call_id)
    if len(alnum) >= 9:
        return alnum[-9:]
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in digest[:9])
