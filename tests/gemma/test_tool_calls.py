"""Tool calling in the library: the parser's golden cases, the call schemas, and the template round trip."""

from __future__ import annotations

import json

import pytest

from gemma.chat_template import DEFAULT_CHAT_TEMPLATE, compile_template
from gemma.tool_calls import (
    ToolCall,
    call_schema,
    calls_from_json,
    check_tools,
    chosen_function,
    may_be_tool_call,
    parse_tool_calls,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
FUNCTIONS = check_tools([WEATHER, TIME])


@pytest.mark.parametrize("text, expected", [
    ('[get_weather(city="Paris")]', [("get_weather", {"city": "Paris"})]),
    ("[get_weather(city='Paris', unit=\"C\"), get_time()]", [("get_weather", {"city": "Paris", "unit": "C"}),
                                                           ("get_time", {})]),
    ('  get_weather(city="Oslo")\n', [("get_weather", {"city": "Oslo"})]),
    ('```tool_code\n[get_weather(city="Rome")]\n```', [("get_weather", {"city": "Rome"})]),
    ("[get_weather(city='x', days=[1, 2.5, -3], opts={'a': True, 'b': None}, ok=true, no=null)]",
     [("get_weather", {"city": "x", "days": [1, 2.5, -3], "opts": {"a": True, "b": None}, "ok": True, "no": None})]),
])
def test_parses_python_style_calls(text: str, expected: list) -> None:
    calls = parse_tool_calls(text, FUNCTIONS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    "[1, 2, 3]",
    '[get_weather("Paris")]',  # positional arguments: the format names every parameter
    '[get_weather(city=os.getcwd())]',  # only literals, nothing is evaluated
    '[get_weather(city="Paris")] and more text',
    '[unknown_function(a=1)]',
    '[get_weather(**{"city": "x"})]',
    '[get_weather(city="Paris"',  # cut short
    "",
])
def test_anything_else_is_text(text: str) -> None:
    assert parse_tool_calls(text, FUNCTIONS) is None


def test_a_stream_holds_back_only_what_may_be_calls() -> None:
    assert may_be_tool_call("[get_wea") and may_be_tool_call("get_weather(") and may_be_tool_call("  ")
    assert may_be_tool_call("```tool")
    assert not may_be_tool_call("The weather") and not may_be_tool_call("Sure, ")


def test_tools_and_tool_choice_are_checked_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        check_tools([{"type": "function"}])
    with pytest.raises(ValueError, match=r"tools\[1\].function.name"):
        check_tools([WEATHER, {"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(ValueError, match="defined twice"):
        check_tools([WEATHER, WEATHER])
    with pytest.raises(ValueError, match=r"tools\[0\].function.parameters"):
        check_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])
    with pytest.raises(ValueError, match="tool_choice: function 'nope'"):
        chosen_function({"type": "function", "function": {"name": "nope"}}, FUNCTIONS)
    with pytest.raises(ValueError, match="tool_choice"):
        chosen_function("sometimes", FUNCTIONS)
    assert chosen_function({"type": "function", "function": {"name": "get_time"}}, FUNCTIONS) == "get_time"
    assert chosen_function("required", FUNCTIONS) is None


def test_call_schemas() -> None:
    named = call_schema(FUNCTIONS, "get_weather")
    assert named == WEATHER["function"]["parameters"]
    required = call_schema(FUNCTIONS, None, parallel=False)
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    assert calls_from_json(text, None) == [ToolCall("get_weather", '{"city": "Paris"}')]
    assert calls_from_json('{"city": "Paris"}', "get_weather") == [ToolCall("get_weather", '{"city": "Paris"}')]
    with pytest.raises(ValueError):
        calls_from_json('{"city": "Pa', "get_weather")


def test_the_template_renders_calls_that_parse_back() -> None:
    template = compile_template(DEFAULT_CHAT_TEMPLATE)
    args = {"city": "Paris", "days": [1, True, None], "opts": {"a": 1.5, "b": "x\"y"}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "20 C"},
    ]
    text = template.render(messages=messages, tools=[WEATHER], add_generation_prompt=True, bos_token="<bos>")
    assert text.startswith("<bos><start_of_turn>user\nYou have access to functions.")
    assert '"name": "get_weather"' in text and text.endswith("<start_of_turn>model\n")
    model_turn = text.split("<start_of_turn>model\n")[1].split("<end_of_turn>")[0]
    (call,) = parse_tool_calls(model_turn, FUNCTIONS)
    assert json.loads(call.arguments) == args
    # consecutive tool results share one user turn
    assert "```tool_output\nsunny\n```\n```tool_output\n20 C\n```<end_of_turn>" in text
    with pytest.raises(ValueError, match="alternate"):
        template.render(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                        add_generation_prompt=True, bos_token="<bos>")
