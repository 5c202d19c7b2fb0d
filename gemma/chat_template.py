"""Chat templates: Gemma's turn format as a Jinja template, rendered in the sandbox transformers uses."""

from __future__ import annotations

import functools
import json
from typing import Any

from gemma.tool_calls import TOOL_INSTRUCTION

# Gemma's turn format. Gemma has no system role: like Gemma 3's official template, a leading system
# message is folded into the first user turn as "{system}\n\n{user}". Validation lives in the template
# so transformers (or vLLM) rendering this same string behaves the same.
# Tools follow Google's function-calling guide for Gemma 3 (gemma/tool_calls.py): with `tools`, the first user
# turn opens with the guide's instruction and the functions as JSON; an assistant's `tool_calls` (arguments as
# dicts) are written as the Python-style call list the instruction asks for; `tool` messages (results) are a
# user turn of ```tool_output blocks, consecutive ones sharing the turn.
DEFAULT_CHAT_TEMPLATE = r"""
{%- macro pyval(v) -%}
    {%- if v is none -%}None
    {%- elif v is boolean -%}{{ 'True' if v else 'False' }}
    {%- elif v is string -%}{{ v | tojson }}
    {%- elif v is mapping -%}
        {{- '{' -}}{%- for k, x in v | dictsort -%}{{ k | tojson }}: {{ pyval(x) }}{{ ', ' if not loop.last }}{%- endfor -%}{{- '}' -}}
    {%- elif v is iterable -%}
        {{- '[' -}}{%- for x in v -%}{{ pyval(x) }}{{ ', ' if not loop.last }}{%- endfor -%}{{- ']' -}}
    {%- else -%}{{ v }}
    {%- endif -%}
{%- endmacro -%}
{%- macro render_calls(calls) -%}
    {{- '[' -}}
    {%- for call in calls -%}
        {%- set fn = call['function'] if call['function'] is defined else call -%}
        {{- fn['name'] ~ '(' -}}
        {%- for k, x in (fn['arguments'] or {}) | dictsort -%}{{ k }}={{ pyval(x) }}{{ ', ' if not loop.last }}{%- endfor -%}
        {{- ')' ~ (', ' if not loop.last) -}}
    {%- endfor -%}
    {{- ']' -}}
{%- endmacro -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part['type'] != 'text' -%}
                {{- raise_exception("Unsupported content part type '" ~ part['type'] ~ "': only text") -}}
            {%- endif -%}
            {{- part['text'] | trim -}}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception("Message content must be a string or a list of {'type': 'text', 'text': ...} parts") -}}
    {%- endif -%}
{%- endmacro -%}
{%- if messages | length == 0 -%}
    {{- raise_exception("Conversation is empty: expected at least one user message") -}}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = render_content(messages[0]['content']) ~ '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools -%}
    {%- set functions = tools | map(attribute='function') | list -%}
    {%- set first_user_prefix = first_user_prefix ~ @TOOL_INSTRUCTION@ ~ '\n' ~ (functions | tojson(indent=2)) ~ '\n\n' -%}
{%- endif -%}
{%- if loop_messages | length == 0 -%}
    {{- raise_exception("A system message must be followed by a user message") -}}
{%- endif -%}
{{- bos_token -}}
{%- set state = namespace(side='model') -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- set where = "Message " ~ (loop.index0 + messages | length - loop_messages | length) ~ ": " -%}
    {%- set side = 'user' if role == 'tool' else role -%}
    {%- set continues = role == 'tool' and loop.previtem is defined and loop.previtem['role'] == 'tool' -%}
    {%- if role == 'system' -%}
        {{- raise_exception(where ~ "a system message is only allowed first") -}}
    {%- elif role not in ['user', 'model', 'tool'] -%}
        {{- raise_exception(where ~ "unknown role '" ~ message['role'] ~ "' (use system, user, assistant, model, tool)") -}}
    {%- elif not continues and side == state.side -%}
        {{- raise_exception(where ~ "roles must alternate user/model after an optional system message (tool results count as user turns)") -}}
    {%- elif loop.first and side != 'user' -%}
        {{- raise_exception(where ~ "roles must alternate user/model after an optional system message (tool results count as user turns)") -}}
    {%- endif -%}
    {%- set state.side = side -%}
    {%- if not continues -%}
        {{- '<start_of_turn>' ~ side ~ '\n' ~ (first_user_prefix if loop.first else '') -}}
    {%- endif -%}
    {%- if role == 'tool' -%}
        {{- '```tool_output\n' ~ render_content(message['content']) ~ '\n```' -}}
        {%- if loop.nextitem is defined and loop.nextitem['role'] == 'tool' -%}{{- '\n' -}}{%- else -%}{{- '<end_of_turn>\n' -}}{%- endif -%}
    {%- else -%}
        {%- set text = render_content(message['content'] if message['content'] is not none else '') -%}
        {{- text -}}
        {%- if message['tool_calls'] -%}{{- ('\n' if text) ~ render_calls(message['tool_calls']) -}}{%- endif -%}
        {{- '<end_of_turn>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
""".replace("@TOOL_INSTRUCTION@", json.dumps(TOOL_INSTRUCTION))  # a JSON string is a Jinja string literal


@functools.lru_cache(maxsize=16)  # compiling costs milliseconds; a compiled template renders thread-safely
def compile_template(source: str) -> Any:
    """A jinja2 template in the sandbox transformers uses, with its helpers (errors raise ValueError)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
        # transformers' override: jinja's own tojson HTML-escapes, which a chat prompt must not do
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.filters["tojson"] = tojson
    return env.from_string(source)
