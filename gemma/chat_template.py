"""Chat templates: Gemma's turn format as a Jinja template, rendered in the sandbox transformers uses."""

from __future__ import annotations

import functools
import json
from typing import Any

# Gemma's turn format. Gemma has no system role: like Gemma 3's official template, a leading system
# message is folded into the first user turn as "{system}\n\n{user}". Validation lives in the template
# so transformers (or vLLM) rendering this same string behaves the same.
DEFAULT_CHAT_TEMPLATE = r"""
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
{%- if loop_messages | length == 0 -%}
    {{- raise_exception("A system message must be followed by a user message") -}}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- set where = "Message " ~ (loop.index0 + messages | length - loop_messages | length) ~ ": " -%}
    {%- if role == 'system' -%}
        {{- raise_exception(where ~ "a system message is only allowed first") -}}
    {%- elif role not in ['user', 'model'] -%}
        {{- raise_exception(where ~ "unknown role '" ~ message['role'] ~ "' (use system, user, assistant, model)") -}}
    {%- elif (role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception(where ~ "roles must alternate user/model after an optional system message") -}}
    {%- endif -%}
    {{- '<start_of_turn>' ~ role ~ '\n' ~ (first_user_prefix if loop.first else '') -}}
    {{- render_content(message['content']) ~ '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


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
