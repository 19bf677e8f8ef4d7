"""`/v1/chat/completions`: messages rendered through the model's chat template, tools and
reasoning parsed from the output, whole or streamed. Shared request handling is in
`service_core.ServiceCore`."""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Sequence,
)
from typing import Any

from adapterhub_server.api.reasoning import ReasoningParser
from adapterhub_server.api.service_core import (
    ServiceCore,
    log_caller,
    sampling_params,
    usage_of,
    utf8_length,
    wire,
    wire_list,
)
from adapterhub_server.api.streams import (
    Call,
    ChoiceResult,
    EventStream,
    PrimedStream,
    collect_all,
    finish_reason,
    sse_frame,
    sse_frames,
)
from adapterhub_server.api.tools import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    ForcedCallParser,
    OutputDelta,
    ReasoningDelta,
    RenderedChat,
    ToolCallDelta,
    forced_call_schema,
    make_tool_parser,
    render_conversation,
    validate_tools,
)
from adapterhub_server.engine.outputs import RequestOutput, TokenLogprob
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import GrammarSpec
from adapterhub_server.errors import (
    InvalidRequestError,
)
from client.types import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    ChatMessage,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    CompletionUsage,
    FinishReason,
)

# One logger for the inference API whichever endpoint module logs: operators filter on it.
logger = logging.getLogger("adapterhub_server.api.service")


OutputReader = ChatOutputParser | ForcedCallParser
"""How a chat choice's text is read back into reasoning, content and tool calls."""


class ChatEndpoint(ServiceCore):
    """What `/v1/chat/completions` calls (`create_chat_completion`)."""

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletion | EventStream:
        """Run `/v1/chat/completions` on the base model's chat template: tools rendered
        and calls parsed (or forced), reasoning split off, output constrained when asked."""
        log_caller(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true", param="top_logprobs"
            )
        tools = wire_list(request.tools)
        tool_choice = wire(request.tool_choice)
        choice = validate_tools(tools, tool_choice, request.parallel_tool_calls)
        parallel = request.parallel_tool_calls is not False
        adapter = self._resolve_request(request)
        self._check_prompt_count(request.n or 1)
        rendered = await self._chat_prompt(request, tools, tool_choice)
        prompt = rendered.token_ids
        if request.max_completion_tokens is not None:
            max_tokens, max_param = request.max_completion_tokens, "max_completion_tokens"
        elif request.max_tokens is not None:
            max_tokens, max_param = request.max_tokens, "max_tokens"
        else:
            # OpenAI's default is "until the context is full".
            max_tokens, max_param = self.engine.max_model_len - len(prompt), "messages"
        self._check_context(len(prompt), max_tokens, "messages", max_param)
        reader: OutputReader | None
        if choice.forced:
            assert tools is not None and tool_choice is not None
            schema = forced_call_schema(tools, tool_choice, parallel)
            grammar = await self._compile(GrammarSpec("json_schema", json.dumps(schema)), "tools")
            reader = ForcedCallParser(tools, tool_choice)
        else:
            grammar = await self._requested_grammar(request)
            reader = _output_reader(rendered, tools, parallel)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = sampling_params(request, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar)
        call = Call(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or self._base_name,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        streams = await self._start(call.id, [prompt], params, adapter, request.n or 1)
        if request.stream:
            return EventStream(self._chat_frames(call, streams, params, reader), streams)
        results = await collect_all(streams)
        choices = []
        for i, result in enumerate(results):
            output = reader.parse(result.text) if reader else ChatOutput(None, result.text)
            choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=_message(output),
                    logprobs=self._chat_logprobs(result.logprobs, params),
                    finish_reason=_chat_finish(result.finish_reason, bool(output.tool_calls)),
                )
            )
        return ChatCompletion(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=choices,
            usage=usage_of(results),
        )

    def _chat_frames(
        self,
        call: Call,
        streams: list[PrimedStream],
        params: SamplingParams,
        reader: OutputReader | None,
    ) -> AsyncGenerator[str, None]:
        totals = [ChoiceResult() for _ in streams]
        parsers = [reader.stream() if reader else None for _ in streams]
        called = [False] * len(streams)

        def chunk(
            choices: list[ChatCompletionChunkChoice], usage: CompletionUsage | None = None
        ) -> str:
            return sse_frame(
                ChatCompletionChunk(
                    id=call.id,
                    created=call.created,
                    model=call.model,
                    choices=choices,
                    usage=usage,
                )
            )

        def frame(index: int, out: RequestOutput) -> str | None:
            parser = parsers[index]
            if parser is None:
                delta = ChoiceDelta(content=out.text or None)
            else:
                deltas = parser.feed(out.text) if out.text else []
                if out.finished:
                    deltas += parser.finish()
                delta = _choice_delta(deltas)
                called[index] = called[index] or bool(delta.tool_calls)
            if not out.finished and delta == ChoiceDelta() and not out.logprobs:
                return None  # the parser holds this text back (a possible call marker)
            reason = finish_reason(out)
            choice = ChatCompletionChunkChoice(
                index=index,
                delta=delta,
                logprobs=self._chat_logprobs(out.logprobs, params),
                finish_reason=None if reason is None else _chat_finish(reason, called[index]),
            )
            return chunk([choice])

        def usage_frame() -> str:
            return chunk([], usage=usage_of(totals))

        # OpenAI opens each choice with the role and empty content.
        opening = [
            chunk(
                [
                    ChatCompletionChunkChoice(
                        index=i, delta=ChoiceDelta(role="assistant", content="")
                    )
                ]
            )
            for i in range(len(streams))
        ]
        return sse_frames(
            streams, totals, frame, usage_frame if call.include_usage else None, opening=opening
        )

    def _chat_logprobs(
        self, logprobs: Sequence[TokenLogprob], params: SamplingParams
    ) -> ChatLogprobs | None:
        if params.logprobs is None:
            return None
        content = []
        for entry in logprobs:
            token = self._token(entry.token_id)
            top = [self._top_logprob(i, lp) for i, lp in entry.top[: params.logprobs]]
            content.append(
                ChatCompletionTokenLogprob(
                    token=token,
                    logprob=entry.logprob,
                    bytes=list(token.encode("utf-8")),
                    top_logprobs=top,
                )
            )
        return ChatLogprobs(content=content)

    async def _chat_prompt(
        self,
        request: ChatCompletionRequest,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
    ) -> RenderedChat:
        """Render the conversation (and tools) with the chat template and tokenize it, in
        a worker thread (`tools.render_conversation`: the one renderer chat and /tokenize
        share)."""
        messages = [m.model_dump(exclude_none=True, by_alias=True) for m in request.messages]
        size = sum(message_bytes(m) for m in request.messages)
        await self.check_text_size(size, "messages")
        return await self.in_worker(
            functools.partial(
                render_conversation,
                self.engine.tokenizer,
                messages,
                tools=tools,
                tool_choice=tool_choice,
                tool_call_parser=self._tool_call_parser,
                chat_template_kwargs=request.chat_template_kwargs,
            )
        )


def message_bytes(message: ChatMessage) -> int:
    """UTF-8 bytes of the text a message puts into the rendered prompt whatever the
    template adds around it: its content, reasoning and call names and arguments."""
    if message.content is None or isinstance(message.content, str):
        texts = [message.content or ""]
    else:
        texts = [part.text for part in message.content]
    texts.append(message.reasoning_content or "")
    texts += [c.function.name + c.function.arguments for c in message.tool_calls or ()]
    return sum(utf8_length(t) for t in texts)


def _output_reader(
    rendered: RenderedChat, tools: list[dict[str, Any]] | None, parallel: bool
) -> ChatOutputParser | None:
    """The parser for a choice's output; None when the text is plain content."""
    if rendered.tool_parser is None and not rendered.reasoning:
        return None
    names = [t["function"]["name"] for t in tools or ()]
    tool_parser = (
        make_tool_parser(rendered.tool_parser, names, parallel_tool_calls=parallel)
        if rendered.tool_parser
        else None
    )
    reasoning = (
        ReasoningParser(starts_in_reasoning=rendered.starts_in_reasoning)
        if rendered.reasoning
        else None
    )
    return ChatOutputParser(tool_parser=tool_parser, reasoning=reasoning)


def _message(output: ChatOutput) -> ChatCompletionMessage:
    calls = [ChatCompletionMessageToolCall.model_validate(c.to_openai()) for c in output.tool_calls]
    return ChatCompletionMessage(
        # Without calls the content is text, even empty; with calls, null unless the model
        # also wrote text.
        content=output.content if calls else (output.content or ""),
        reasoning_content=output.reasoning,
        tool_calls=calls or None,
    )


def _choice_delta(deltas: Sequence[OutputDelta]) -> ChoiceDelta:
    """One chunk's delta from the parser's deltas (all three kinds may share a chunk)."""
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
    calls = [
        ChoiceDeltaToolCall.model_validate(d.to_openai())
        for d in deltas
        if isinstance(d, ToolCallDelta)
    ]
    return ChoiceDelta(
        content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None
    )


def _chat_finish(reason: FinishReason | None, called: bool) -> FinishReason:
    """`tool_calls` when a choice that ended naturally made calls (OpenAI's rule)."""
    if reason in (None, "stop") and called:
        return "tool_calls"
    return reason or "stop"
