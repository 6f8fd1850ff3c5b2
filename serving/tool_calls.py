"""Tool calls in DeepSeek-V3's format, turned into OpenAI ``tool_calls`` (whole or streamed).

DeepSeek-V3's chat template writes an assistant turn that calls tools as::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and tool results as ``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>
...<｜tool▁outputs▁end｜>`` (that part is the template's job). The model generates the first
form; ``ToolCallParser`` reads it from the reply text, chunk by chunk: text before
``<｜tool▁calls▁begin｜>`` is the message content, each call becomes one OpenAI tool call
(``id``, ``function.name`` once the name line is complete, then ``function.arguments`` in
fragments with the closing fence held back), and whatever follows ``<｜tool▁calls▁end｜>`` is
dropped. The parser works on text, so it reads the format whether the markers are single
special tokens or plain text (a tokenizer without them). Arguments are passed on as the model
wrote them (a JSON string, not re-serialized).

``tool_choice``: ``none`` renders the tools but does not parse; ``auto`` parses; ``required`` and
a named function force the reply to start inside a call by appending ``forced_prefix`` to the
prompt (required: up to the function name; named: up to the arguments). What follows the prefix is
then constrained by ``call_grammar`` (structured output): one of the tools' names, arguments that
fit the function's ``parameters`` schema, the closing markers; with ``required`` and parallel
calls, further calls in the same form.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Callable

from engine.structured_output import JSON_WHITESPACE

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE_OPEN = "```json\n"  # after the name line
CLOSE_ARGS = "\n```"  # after the arguments, before CALL_END
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

# Whitespace, up to three backticks, whitespace: a closing fence that may still be arriving.
_FENCE_TAIL = re.compile(r"\s*`{0,3}\s*\Z")


def forced_prefix(tool_choice: str | None, function_name: str | None = None) -> str:
    """Text the reply is forced to start with: for ``required`` a call up to its name, for a named function
    the call up to its arguments; nothing otherwise."""
    if function_name is not None:
        return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{function_name}\n{FENCE_OPEN}"
    if tool_choice == "required":
        return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}"
    return ""


# Arguments: JSON with bounded whitespace; schema keywords the grammar library lacks are ignored, not an error.
_ARGS_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE, "lenient": True}


def call_grammar(functions: dict[str, dict[str, Any] | None], function_name: str | None, parallel: bool,
                 literal: Callable[[str], str] = json.dumps) -> str:
    """A Lark grammar (llguidance's dialect) for the reply after ``forced_prefix``: for a named function its
    arguments (``functions[name]`` is its JSON schema; None: any object) and the closing markers; for
    ``required`` a name of ``functions``, its arguments, then (``parallel``) more calls, then the end marker.
    ``literal(marker)`` spells a marker in the grammar (a special token is ``<[id]>``, text a string)."""
    def args(name: str) -> str:
        schema = {**(functions[name] or {"type": "object"}), "x-guidance": _ARGS_OPTIONS}
        return f"%json {json.dumps(schema)} {literal(CLOSE_ARGS)} {literal(CALL_END)}"

    if function_name is not None:
        return f"start: {args(function_name)} {literal(CALLS_END)}\n"
    rules = [f"call_{i}: {literal(f'{name}{chr(10)}{FENCE_OPEN}')} {args(name)}" for i, name in enumerate(functions)]
    call = " | ".join(f"call_{i}" for i in range(len(functions)))
    more = f"({literal(chr(10))}? {literal(CALL_BEGIN)} {literal('function')} {literal(SEP)} call)*" if parallel else ""
    return "\n".join([f"start: call {more} {literal(CALLS_END)}", f"call: {call}", *rules]) + "\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Parsed:
    """What one piece of reply text produced: message content and tool-call deltas (OpenAI's shape)."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def extend(self, other: "Parsed") -> None:
        self.content += other.content
        self.tool_calls += other.tool_calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental parser for one choice's reply: ``feed(text)`` per delta, ``finish()`` at the end."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls  # later calls are dropped (a named tool_choice, parallel_tool_calls=false)
        self.calls: list[ToolCall] = []
        self.content = ""
        self._buf = ""  # text not consumed yet
        self._state = "content"  # content | calls | type | name | fence | args | done

    def feed(self, text: str) -> Parsed:
        self._buf += text
        out = Parsed()
        while True:
            step = getattr(self, "_" + self._state)(out)
            if not step:
                return out

    def finish(self) -> Parsed:
        """The reply ended (stop, length, a stop string): release held-back text, close an open call."""
        out = Parsed()
        if self._state == "content":
            self._emit_content(out, self._buf)
        elif self._state == "args":
            self._close_args(out, self._buf)
        self._buf, self._state = "", "done"
        return out

    # ---- states: each consumes from _buf and returns True when it moved on, False when it needs more
    def _content(self, out: Parsed) -> bool:
        at = self._buf.find(CALLS_BEGIN)
        if at < 0:
            keep = _partial_suffix(self._buf, CALLS_BEGIN)
            self._emit_content(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit_content(out, self._buf[:at])
        self._buf = self._buf[at + len(CALLS_BEGIN):]
        self._state = "calls"
        return True

    def _calls(self, out: Parsed) -> bool:
        rest = self._buf.lstrip()
        for marker, state in ((CALL_BEGIN, "type"), (CALLS_END, "done")):
            if rest.startswith(marker):
                self._buf, self._state = rest[len(marker):], state
                return True
        if any(marker.startswith(rest) for marker in (CALL_BEGIN, CALLS_END)):
            return False  # a marker may still be arriving
        nxt = [i for i in (rest.find(CALL_BEGIN), rest.find(CALLS_END)) if i >= 0]
        keep = max(_partial_suffix(rest, CALL_BEGIN), _partial_suffix(rest, CALLS_END))
        self._buf = rest[min(nxt):] if nxt else rest[len(rest) - keep:]
        return bool(nxt)  # text between calls is not part of any call: dropped

    def _type(self, out: Parsed) -> bool:
        at = self._buf.find(SEP)
        if at < 0:
            return False
        self._buf, self._state = self._buf[at + len(SEP):], "name"  # the type is always "function"
        return True

    def _name(self, out: Parsed) -> bool:
        ends = [i for i in (self._buf.find("\n"), self._buf.find(CALL_END)) if i >= 0]
        if not ends:
            return False
        name = self._buf[:min(ends)].strip()
        self._buf = self._buf[min(ends):].removeprefix("\n")
        call = ToolCall(len(self.calls), new_call_id(), name)
        self.calls.append(call)
        out.tool_calls.append({"index": call.index, "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
        self._state = "fence"
        return True

    def _fence(self, out: Parsed) -> bool:
        if FENCE_OPEN.startswith(self._buf) and self._buf != FENCE_OPEN:
            return False  # the opening fence may still be arriving
        self._buf = self._buf.removeprefix(FENCE_OPEN)
        self._state = "args"
        return True

    def _args(self, out: Parsed) -> bool:
        at = self._buf.find(CALL_END)
        if at >= 0:
            self._close_args(out, self._buf[:at])
            self._buf = self._buf[at + len(CALL_END):]
            self._state = "done" if self.max_calls is not None and len(self.calls) >= self.max_calls else "calls"
            return True
        safe = self._buf[:len(self._buf) - _partial_suffix(self._buf, CALL_END)]
        safe = safe[:_FENCE_TAIL.search(safe).start()]
        self._emit_args(out, safe)
        self._buf = self._buf[len(safe):]
        return False

    def _done(self, out: Parsed) -> bool:
        self._buf = ""  # after <｜tool▁calls▁end｜> (the end-of-sentence token, if shown): not part of the reply
        return False

    # ---- output
    def _emit_content(self, out: Parsed, text: str) -> None:
        self.content += text
        out.content += text

    def _emit_args(self, out: Parsed, text: str) -> None:
        if text:
            call = self.calls[-1]
            call.arguments += text
            out.tool_calls.append({"index": call.index, "function": {"arguments": text}})

    def _close_args(self, out: Parsed, text: str) -> None:
        """The call's last argument text: everything before the closing fence."""
        self._emit_args(out, text[:_FENCE_TAIL.search(text).start()])
