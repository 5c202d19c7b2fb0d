"""Tool calls in chat responses: what a finished choice's text is (calls or content), and how a stream shows it.

`ToolMode` is one chat request's `tools` + `tool_choice` + `parallel_tool_calls`. With "required" or a named
function the engine constrains the output to `gemma.tool_calls.call_schema`, so the calls are read as JSON; with
"auto" the text is parsed for Gemma's Python-style calls and is content when it holds none.

Streams follow OpenAI: a call's first delta carries its index, id, type and name (arguments ""), later deltas
argument fragments. A named function's arguments stream as they are generated (its output is the arguments);
"required" and "auto" hold the text back while it may still be calls (auto streams it as content as soon as it
cannot be), then send each call whole. The arguments a stream sends add up to the non-streamed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments import schemas as s
from gemma.tool_calls import ToolCall, calls_from_json, may_be_tool_call, parse_tool_calls


@dataclass(frozen=True)
class ToolMode:
    functions: dict[str, dict[str, Any]]
    mode: str  # "auto", "required" or the name of the function tool_choice names
    parallel: bool = True

    @classmethod
    def of(cls, body: s.ChatCompletionRequest) -> ToolMode | None:
        mode = body.tool_mode
        return None if mode is None else cls(body.functions, mode, body.parallel_tool_calls)

    @property
    def named(self) -> str | None:
        return self.mode if self.mode not in ("auto", "required") else None

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls `text` makes (with fresh ids), or None when it is content."""
        if self.mode == "auto":
            calls = parse_tool_calls(text, self.functions)
        else:
            try:
                calls = calls_from_json(text, self.named)
            except (ValueError, KeyError, TypeError):  # cut short (finish_reason "length"): not a call
                calls = None
        if calls and not self.parallel:
            calls = calls[:1]
        return [c.with_id() for c in calls] if calls else None

    def message(self, text: str) -> tuple[s.AssistantMessage, bool]:
        """A finished choice's message, and whether it holds calls."""
        calls = self.calls(text)
        if calls is None:
            return s.AssistantMessage(content=text), False
        return s.AssistantMessage(content=None, tool_calls=[_out(c) for c in calls]), True


@dataclass
class ToolStream:
    """What one streamed choice has shown: `step` turns the choice's text so far into the next delta."""

    mode: ToolMode
    shown: int = 0  # characters of text consumed (sent as content or as arguments)
    content: bool = False  # text is being streamed as content (auto, once it cannot be calls)
    call_id: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def step(self, text: str, finished: bool) -> tuple[s.DeltaMessage | None, bool]:
        """The delta for `text` (None when there is nothing to send yet), and whether the choice made calls."""
        if self.mode.named is not None:
            return self._arguments(text, finished)
        if not self.content and not finished and may_be_tool_call(text):
            return None, False  # may still be calls: held back
        if not self.content and finished:
            calls = self.mode.calls(text)
            if calls:
                self.shown, self.calls = len(text), calls
                deltas = []
                for i, c in enumerate(calls):
                    deltas += [s.DeltaToolCall(index=i, id=c.id, type="function",
                                               function=s.DeltaFunction(name=c.name, arguments="")),
                               s.DeltaToolCall(index=i, function=s.DeltaFunction(arguments=c.arguments))]
                return s.DeltaMessage(tool_calls=deltas), True
        self.content = True
        delta, self.shown = text[self.shown:], len(text)
        return (s.DeltaMessage(content=delta) if delta or finished else None), False

    def _arguments(self, text: str, finished: bool) -> tuple[s.DeltaMessage | None, bool]:
        deltas = []
        if not self.call_id:
            self.call_id = ToolCall(self.mode.named, "").with_id().id
            deltas.append(s.DeltaToolCall(index=0, id=self.call_id, type="function",
                                          function=s.DeltaFunction(name=self.mode.named, arguments="")))
        fragment, self.shown = text[self.shown:], len(text)
        if fragment:
            deltas.append(s.DeltaToolCall(index=0, function=s.DeltaFunction(arguments=fragment)))
        made = finished and self.mode.calls(text) is not None  # cut short (length): no call
        return (s.DeltaMessage(tool_calls=deltas) if deltas else None), made



def _out(call: ToolCall) -> s.ToolCallOut:
    return s.ToolCallOut(id=call.id, function=s.ToolCallFunction(name=call.name, arguments=call.arguments))
