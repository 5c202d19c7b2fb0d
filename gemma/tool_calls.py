"""Tool (function) calling for Gemma: the prompt that offers tools, the parser of the calls, the call grammars.

Gemma has no tool tokens. Google's function-calling guide for Gemma 3 (https://ai.google.dev/gemma/docs/
capabilities/function-calling) offers the functions in the user turn as JSON, with an instruction to answer
with Python-style calls, `[func_name1(param=value, ...), func_name2(...)]`, and nothing else; `TOOL_INSTRUCTION`
is that instruction, and `DEFAULT_CHAT_TEMPLATE` (gemma/chat_template.py) renders it, earlier calls (as that
same list) and tool results (a user turn holding a ```tool_output block, the guide's convention for results).

- `parse_tool_calls(text)` reads such a list (or one bare call) from a model's output with Python's own parser
  (`ast`; values are literals only, nothing is evaluated); anything else is text, the `tool_choice: "auto"` rule.
- `tool_choice` "required" or a named function are constrained instead of parsed: `call_schema` is the JSON
  schema the output must match (the named function's parameters, or a list of `{"name", "parameters"}`
  objects), so the arguments always validate against the function's `parameters`; `calls_from_json` reads it.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

# Google's instruction for Python-style calls (the guide's first prompt), line for line.
TOOL_INSTRUCTION = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format "
    "of\n[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n\n"
    "You SHOULD NOT include any other text in the response if you call a function"
)
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a Python identifier: the call syntax needs one
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_FENCE = re.compile(r"^```(?:tool_code|python)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One function call: `arguments` is a JSON object's text, as OpenAI's `function.arguments` is."""

    name: str
    arguments: str
    id: str = ""

    def with_id(self) -> ToolCall:
        return ToolCall(self.name, self.arguments, self.id or f"call_{uuid.uuid4().hex[:24]}")


def check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenAI `tools` -> {name: parameters schema}; ValueError naming the bad entry (`tools[i]...`)."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f'{where}: must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(f"{where}.function.name: must be an identifier of letters, digits and _ "
                             f"(at most 64, not starting with a digit), got {name!r}")
        if name in functions:
            raise ValueError(f"{where}.function.name: {name!r} is defined twice")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters: must describe an object (type: object)")
        functions[name] = params
    return functions


def chosen_function(tool_choice: Any, functions: dict[str, dict[str, Any]]) -> str | None:
    """The function a named `tool_choice` forces (None for "none"/"auto"/"required"); ValueError if unknown."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "none", "auto", "required"):
            raise ValueError(f'tool_choice: must be "none", "auto", "required" or a function, got {tool_choice!r}')
        if tool_choice == "required" and not functions:
            raise ValueError('tool_choice: "required" needs at least one tool')
        return None
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError('tool_choice: must be {"type": "function", "function": {"name": ...}}')
    if name not in functions:
        raise ValueError(f"tool_choice: function {name!r} is not among the tools")
    return name


def call_schema(functions: dict[str, dict[str, Any]], name: str | None, parallel: bool = True) -> dict[str, Any]:
    """The JSON schema a constrained tool call matches: `name`'s parameters (a named choice), else (required) a
    list of 1 (or, with `parallel`, more) `{"name": <a tool>, "parameters": <its parameters>}` objects."""
    if name is not None:
        return functions[name]
    items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
              "required": ["name", "parameters"], "additionalProperties": False} for n, p in functions.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def calls_from_json(text: str, name: str | None) -> list[ToolCall]:
    """The calls in a constrained output (see `call_schema`); the named choice's text is its arguments as is."""
    if name is not None:
        json.loads(text)  # raises on an output cut short
        return [ToolCall(name, text)]
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]


def parse_tool_calls(text: str, functions: dict[str, dict[str, Any]] | None = None) -> list[ToolCall] | None:
    """The calls in `text` when all of it (bar whitespace and a ```tool_code fence) is `[f(a=1), g()]` or `f(a=1)`
    with keyword arguments of literal values; None when it is anything else (then it is text). With `functions`,
    a call of a function not among them also makes it text."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body or not (body.startswith("[") or re.match(r"^[A-Za-z_]\w*\(", body)):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if functions is not None and node.func.id not in functions:
            return None
        try:
            arguments = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        if len(arguments) != len(node.keywords):
            return None  # **kwargs
        calls.append(ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def may_be_tool_call(text: str) -> bool:
    """Whether a partial output could still turn out to be a call list (a stream holds such text back)."""
    body = text.lstrip()
    return not body or body.startswith("[") or body.startswith("`") or bool(re.match(r"^[A-Za-z_]\w*(\(|$)", body))


def _literal(node: ast.expr) -> Any:
    """A Python literal (JSON's true/false/null too); ValueError for anything that would need evaluating."""
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    value = ast.literal_eval(node)  # numbers, strings, -x; raises ValueError on names and calls
    if isinstance(value, complex | bytes | set):
        raise ValueError("not a JSON value")
    return value
