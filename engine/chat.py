"""A chat conversation -> prompt token ids: the one implementation behind ``LLM.chat`` and
``POST /v1/chat/completions``.

Messages are OpenAI's: ``role`` system, developer (rendered as system), user, assistant or tool;
``content`` a string, a list of ``{"type": "text", "text": ...}`` parts (joined with newlines),
or null for an assistant message that only calls tools (and for tool messages, read as "");
assistant ``tool_calls`` (``{"id", "type": "function", "function": {"name", "arguments"}}``, the
arguments a JSON string as OpenAI sends them, which is what DeepSeek-V3's template concatenates)
and tool ``tool_call_id`` pass through to the template. The model's chat template renders them
(``tools`` and other keyword arguments become template variables); the rendered text carries the
BOS token, so it is encoded without special tokens.

Errors are ``ChatFormatError`` (a ``ValueError``) whose ``param`` names the offending field the
way the HTTP API reports it (``messages[2].content[0].type``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from engine.tokenizer import ChatTemplateError, Tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _content_text(message: Mapping[str, Any], i: int) -> str | None:
    content = message.get("content")
    if message["role"] == "assistant" and message.get("tool_calls") and not content:
        return None  # DeepSeek-V3's template renders a tool-call turn when content is none
    if content is None:
        if message["role"] in ("assistant", "tool"):
            return ""
        raise ChatFormatError(f"messages[{i}].content is required for role {message['role']!r}",
                              f"messages[{i}].content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"messages[{i}].content must be a string or a list of text parts, got "
                              f"{type(content).__name__}", f"messages[{i}].content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(text, str):
            raise ChatFormatError(f"messages[{i}].content[{j}]: only text content parts are supported, got "
                                  f"{kind if kind is not None else part!r}", f"messages[{i}].content[{j}].type")
        texts.append(text)
    return "\n".join(texts)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: plain dicts, absent fields left out (templates test ``in``)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("messages must be a non-empty list of message objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content', got "
                                  f"{type(m).__name__}", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                                  f"messages[{i}].role")
        d = {k: v for k, v in m.items() if v is not None}
        d["role"] = "system" if m["role"] == "developer" else m["role"]
        d["content"] = _content_text(m, i)
        out.append(d)
    return out


def render_chat(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, suffix: str = "",
                template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of the conversation rendered by the model's chat template, then ``suffix`` (text the
    reply is forced to start with). Raises ``ChatFormatError``."""
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        text = tok.apply_chat_template(template_messages(messages), add_generation_prompt=add_generation_prompt,
                                       **kwargs)
    except ChatTemplateError as e:
        raise ChatFormatError(str(e), "messages") from e
    ids = tok.encode(text + suffix, add_special_tokens=False)
    if not ids:
        raise ChatFormatError("the rendered conversation is empty", "messages")
    return ids
