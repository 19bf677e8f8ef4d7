"""Tool calling for the chat API: validating `tools`/`tool_choice`, rendering tools and tool
history with the model's chat template, parsing calls (and reasoning) out of the output,
and the JSON schema that forces a call.

Flow for one chat request (see each module for the details):

1. `validate_tools(tools, tool_choice, parallel_tool_calls)` -> `ToolChoice`;
2. `render_conversation(tokenizer, messages, tools=..., tool_choice=..., ...)` in a worker
   thread -> `RenderedChat` (token ids, which parser, reasoning);
3. forced choices (`ToolChoice.forced`): decode under `forced_call_schema(...)`, then
   `calls_from_forced_output(text, ...)`; otherwise parse the output with a
   `ChatOutputParser` built from `make_tool_parser(rendered.tool_parser, ...)` and a
   `ReasoningParser`.
"""

from adapterhub_server.api.tools.forcing import calls_from_forced_output, forced_call_schema
from adapterhub_server.api.tools.output import (
    ChatOutputParser,
    ChatOutputStream,
    ForcedCallParser,
    ForcedCallStream,
)
from adapterhub_server.api.tools.parsers import (
    TOOL_PARSERS,
    ToolCallParser,
    ToolCallStream,
    make_tool_parser,
)
from adapterhub_server.api.tools.rendering import (
    ChatTemplateTraits,
    RenderedChat,
    chat_template_traits,
    render_conversation,
)
from adapterhub_server.api.tools.types import (
    ChatOutput,
    ContentDelta,
    OutputDelta,
    ParsedToolCalls,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
)
from adapterhub_server.api.tools.validation import MAX_TOOLS, ToolChoice, validate_tools

__all__ = [
    "MAX_TOOLS",
    "TOOL_PARSERS",
    "ChatOutput",
    "ChatOutputParser",
    "ChatOutputStream",
    "ChatTemplateTraits",
    "ContentDelta",
    "ForcedCallParser",
    "ForcedCallStream",
    "OutputDelta",
    "ParsedToolCalls",
    "ReasoningDelta",
    "RenderedChat",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolCallStream",
    "ToolChoice",
    "calls_from_forced_output",
    "chat_template_traits",
    "forced_call_schema",
    "make_tool_parser",
    "render_conversation",
    "validate_tools",
]
