"""Rendering tools and tool history with real tokenizers and chat templates.

The templates under `chat_templates/` are copies of the tool parts of Qwen2.5's, Llama 3.1's
and Mistral v0.3's templates (and SmolLM2's plain ChatML), rendered with the tiny ChatML
tokenizer: the tokenizer only turns the rendered text into ids, the conventions are the
templates'.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from adapterhub_server.api.tools import (
    ChatTemplateTraits,
    chat_template_traits,
    render_conversation,
)
from adapterhub_server.api.tools.rendering import detect_tool_parser, hermes_tools_block
from adapterhub_server.errors import InvalidRequestError
from tests.api.fake_engine import shared_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "kelvin"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone"}}
TOOLS = [WEATHER, TIME]

CALL_ID = "call_Xq3mZb7RkT2nLw9vHc4pYs1d"
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": '{"temp_c": 21, "sky": "clear"}'},
]


def _tokenizer(template: str | None):
    tokenizer = copy.copy(shared_tokenizer())
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / template).read_text()
    return tokenizer


@pytest.mark.parametrize(
    ("template", "traits"),
    [
        (None, ChatTemplateTraits(False, False, "hermes", False)),
        ("smollm2.jinja", ChatTemplateTraits(False, False, "hermes", False)),
        ("qwen2_5.jinja", ChatTemplateTraits(True, True, "hermes", False)),
        ("qwen3.jinja", ChatTemplateTraits(True, True, "hermes", True)),
        ("llama3_1.jinja", ChatTemplateTraits(True, True, "llama3_json", False)),
        ("mistral_v3.jinja", ChatTemplateTraits(True, True, "mistral", False)),
        ("deepseek_r1.jinja", ChatTemplateTraits(False, False, "hermes", True)),
    ],
)
def test_template_traits(template, traits):
    assert chat_template_traits(_tokenizer(template)) == traits


def test_detect_tool_parser_from_source():
    assert detect_tool_parser((TEMPLATES / "mistral_v3.jinja").read_text()) == "mistral"
    assert detect_tool_parser((TEMPLATES / "llama3_1.jinja").read_text()) == "llama3_json"
    assert detect_tool_parser((TEMPLATES / "qwen2_5.jinja").read_text()) == "hermes"
    assert detect_tool_parser(shared_tokenizer().chat_template) == "hermes"


def test_traits_follow_a_changed_template():
    tokenizer = _tokenizer(None)
    assert not chat_template_traits(tokenizer).renders_tools
    tokenizer.chat_template = (TEMPLATES / "qwen2_5.jinja").read_text()
    assert chat_template_traits(tokenizer).renders_tools


# --- templates that do not render tools (the default model's ChatML) -------------------------


@pytest.mark.parametrize("template", [None, "smollm2.jinja"])
def test_chatml_gets_a_hermes_block_and_text_history(template):
    tokenizer = _tokenizer(template)
    rendered = render_conversation(tokenizer, HISTORY, tools=TOOLS)
    assert rendered.tool_parser == "hermes"
    block = hermes_tools_block(TOOLS)
    # appended to the existing system turn
    assert rendered.prompt.startswith(f"<|im_start|>system\nYou are terse.\n\n{block}<|im_end|>")
    for tool in TOOLS:
        assert json.dumps(tool) in rendered.prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21, "sky": "clear"}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in rendered.prompt
    assert rendered.token_ids == tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(rendered.token_ids) == rendered.prompt


def test_chatml_matches_qwen_rendering_of_the_same_history():
    """The text history the server writes for ChatML is what Qwen2.5's own template writes."""
    chatml = render_conversation(_tokenizer(None), HISTORY, tools=TOOLS).prompt
    qwen = render_conversation(_tokenizer("qwen2_5.jinja"), HISTORY, tools=TOOLS).prompt
    assert chatml == qwen


def test_system_turn_is_inserted_when_missing():
    rendered = render_conversation(_tokenizer("smollm2.jinja"), HISTORY[1:2], tools=TOOLS)
    assert rendered.prompt.startswith(f"<|im_start|>system\n{hermes_tools_block(TOOLS)}<|im_end|>")
    assert "SmolLM" not in rendered.prompt  # one system turn, ours


def test_consecutive_tool_results_share_one_user_turn():
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate([("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")])
    ]
    messages = [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_1", "content": "09:00"},
    ]
    prompt = render_conversation(_tokenizer(None), messages, tools=TOOLS).prompt
    assert (
        "<|im_start|>assistant\nLooking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n"
        "<tool_response>\n09:00\n</tool_response><|im_end|>\n"
    ) in prompt


# --- templates that render tools --------------------------------------------------------------


def test_qwen2_5_renders_tools_and_history_itself():
    tokenizer = _tokenizer("qwen2_5.jinja")
    rendered = render_conversation(tokenizer, HISTORY, tools=TOOLS)
    assert rendered.tool_parser == "hermes"
    assert rendered.prompt.count("# Tools") == 1  # the template's block, not ours as well
    assert json.dumps(WEATHER) in rendered.prompt
    assert '"arguments": {"city": "Paris"}}' in rendered.prompt  # a dict, not a JSON string
    # the same ids as the template's own tokenization
    hf_conversation = [
        HISTORY[0],
        HISTORY[1],
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": CALL_ID,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": CALL_ID,
            "name": "get_weather",
            "content": HISTORY[3]["content"],
        },
    ]
    expected = tokenizer.apply_chat_template(
        hf_conversation, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert rendered.token_ids == list(expected)


def test_llama3_1_renders_tools_in_the_first_user_turn():
    rendered = render_conversation(_tokenizer("llama3_1.jinja"), HISTORY, tools=TOOLS)
    assert rendered.tool_parser == "llama3_json"
    assert json.dumps(WEATHER, indent=4) in rendered.prompt
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n"
    ) in rendered.prompt
    assert '{\\"temp_c\\": 21' in rendered.prompt  # the template quotes string results
    assert rendered.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_mistral_gets_nine_character_ids():
    tokenizer = _tokenizer("mistral_v3.jinja")
    history = HISTORY[1:]
    # the template itself refuses OpenAI-style ids
    hf = [
        history[0],
        {
            "role": "assistant",
            "tool_calls": [
                {"id": CALL_ID, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
    ]
    with pytest.raises(Exception, match="length 9"):
        tokenizer.apply_chat_template(hf, tokenize=False)

    follow_up = [
        {"role": "assistant", "content": "21 °C and clear."},
        {"role": "user", "content": "And Rome?"},
    ]
    rendered = render_conversation(tokenizer, history + follow_up, tools=TOOLS)
    assert rendered.tool_parser == "mistral"
    short = CALL_ID[-9:]
    assert (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
        f'"id": "{short}"}}]'
    ) in rendered.prompt
    assert f'"call_id": "{short}"}}[/TOOL_RESULTS]' in rendered.prompt
    assert '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"' in (
        rendered.prompt
    )
    assert rendered.prompt.index("[AVAILABLE_TOOLS]") > rendered.prompt.index("[TOOL_RESULTS]")


def test_mistral_ids_shorter_than_nine_characters_still_match():
    calls = [{"id": "c-1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c-1", "content": "noon"},
    ]
    prompt = render_conversation(_tokenizer("mistral_v3.jinja"), messages, tools=TOOLS).prompt
    call_id = prompt.split('"id": "')[1][:9]
    assert call_id.isalnum() and f'"call_id": "{call_id}"' in prompt


# --- tool_choice --------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, "qwen2_5.jinja"])
def test_tool_choice_none_leaves_tools_out_but_keeps_history(template):
    rendered = render_conversation(_tokenizer(template), HISTORY, tools=TOOLS, tool_choice="none")
    assert rendered.tool_parser is None
    assert "# Tools" not in rendered.prompt and "get_time" not in rendered.prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered.prompt


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_forced_tool_choice_shows_tools_without_a_parser(choice):
    rendered = render_conversation(_tokenizer(None), HISTORY[:2], tools=TOOLS, tool_choice=choice)
    assert rendered.tool_parser is None
    assert json.dumps(TIME) in rendered.prompt


def test_no_tools_no_parser():
    rendered = render_conversation(_tokenizer(None), HISTORY[:2])
    assert rendered.tool_parser is None and "# Tools" not in rendered.prompt


def test_configured_parser_wins_over_detection():
    rendered = render_conversation(
        _tokenizer("qwen2_5.jinja"), HISTORY[:2], tools=TOOLS, tool_call_parser="llama3_json"
    )
    assert rendered.tool_parser == "llama3_json"
    with pytest.raises(ValueError):
        render_conversation(_tokenizer(None), HISTORY[:2], tools=TOOLS, tool_call_parser="xml")


# --- message forms and errors -------------------------------------------------------------------


def test_developer_role_and_text_parts():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    prompt = render_conversation(_tokenizer(None), messages).prompt
    assert prompt == (
        "<|im_start|>system\nRule one.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _param(exc_info) -> str:
    return exc_info.value.param


def test_history_arguments_must_be_json():
    bad = copy.deepcopy(HISTORY)
    bad[2]["tool_calls"][0]["function"]["arguments"] = '{"city": Paris}'
    with pytest.raises(InvalidRequestError) as exc:
        render_conversation(_tokenizer("qwen2_5.jinja"), bad, tools=TOOLS)
    assert _param(exc) == "messages[2].tool_calls[0].function.arguments"


def test_user_content_is_required_and_parts_must_be_text():
    with pytest.raises(InvalidRequestError) as exc:
        render_conversation(_tokenizer(None), [{"role": "user", "content": None}])
    assert _param(exc) == "messages[0].content"
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.raises(InvalidRequestError) as exc:
        render_conversation(_tokenizer(None), [{"role": "user", "content": [image]}])
    assert _param(exc) == "messages[0].content[0]"


@pytest.mark.parametrize(
    "key",
    ["tools", "messages", "add_generation_prompt", "tokenize", "bos_token", "not an identifier"],
)
def test_reserved_chat_template_kwargs(key):
    with pytest.raises(InvalidRequestError) as exc:
        render_conversation(_tokenizer(None), HISTORY[:2], chat_template_kwargs={key: 1})
    assert _param(exc).startswith("chat_template_kwargs")


def test_template_refusal_is_a_client_error():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="alternate") as exc:
        render_conversation(_tokenizer("mistral_v3.jinja"), messages)
    assert _param(exc) == "messages"


def test_no_chat_template():
    tokenizer = copy.copy(shared_tokenizer())
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_conversation(tokenizer, HISTORY[:2])
