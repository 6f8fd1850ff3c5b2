"""A model's tokenizer (engine and API layer share it; torch-free): a model directory's ``tokenizer.json`` plus its chat template.

``load_tokenizer(model_dir)`` reads ``tokenizer.json`` (a Hugging Face ``tokenizers``
file) and ``tokenizer_config.json`` (special tokens, ``add_bos_token``/``add_eos_token``,
``chat_template``; a ``chat_template.jinja`` beside them is used when the config has
none), the layout DeepSeek-V3 checkpoints ship.

Prompt encoding follows Hugging Face: when the config says ``add_bos_token`` /
``add_eos_token`` (LlamaTokenizerFast, which DeepSeek-V3 uses) those decide, otherwise
the ``tokenizer.json`` post-processor adds whatever special tokens it defines. Rendered
chat templates already contain the BOS token, so they are encoded without special tokens.

Chat templates run in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with the
helpers HF provides (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text), so a template cannot reach Python internals or mutate its inputs.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


class TokenizerLoadError(Exception):
    """The model directory has no usable tokenizer files."""


class ChatTemplateError(ValueError):
    """The chat template rejected the conversation (``raise_exception``) or failed to render."""


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _pick_chat_template(value: Any) -> str | None:
    """``chat_template`` is a string, or HF's list of ``{"name", "template"}`` (use "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode plus chat-template rendering for one model."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any], chat_template: str | None = None):
        self._tok = tokenizer
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.add_bos_token = config.get("add_bos_token")
        self.add_eos_token = config.get("add_eos_token")
        self.chat_template = chat_template if chat_template is not None else _pick_chat_template(config.get("chat_template"))
        self.bos_token_id = self._token_id(self.bos_token)
        self.eos_token_id = self._token_id(self.eos_token)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        if self.chat_template:
            _compile_template(self.chat_template)  # a syntax error surfaces at load time

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (incremental detokenization works on it)."""
        return self._tok

    @property
    def eos_token_ids(self) -> list[int]:
        return [] if self.eos_token_id is None else [self.eos_token_id]

    @staticmethod
    def available(model_dir: str) -> bool:
        return os.path.isfile(os.path.join(model_dir, "tokenizer.json"))

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer":
        return load_tokenizer(model_dir)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens as Hugging Face would add them for a prompt.

        ``ValueError`` when ``text`` is not valid Unicode (a lone surrogate).
        """
        explicit = self.add_bos_token is not None or self.add_eos_token is not None
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens and not explicit).ids
        except TypeError:  # the Rust side takes only valid Unicode: a lone surrogate ("\ud800") lands here
            if isinstance(text, str):
                raise ValueError("text is not valid Unicode (it holds a lone UTF-16 surrogate)") from None
            raise
        if add_special_tokens and explicit:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs); partial UTF-8 shows as U+FFFD."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation to prompt text with the model's chat template.

        ``kwargs`` become template variables (e.g. ``tools``, ``chat_template_kwargs``
        entries). Raises ``ChatTemplateError`` when the model has no template or the
        template rejects the conversation.
        """
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        context = {
            "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "", "unk_token": self.unk_token or "",
            **kwargs,
            "messages": messages, "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compile_template(self.chat_template).render(**context)
        except Exception as e:  # template code is data: whatever it raises is about this conversation
            raise ChatTemplateError(f"chat template error: {e}") from e


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} must hold a JSON object")
    return data


def load_tokenizer(model_dir: str) -> Tokenizer:
    """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) from ``model_dir``."""
    if not os.path.isdir(model_dir):
        raise TokenizerLoadError(f"model directory {model_dir!r} does not exist")
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise TokenizerLoadError(f"{model_dir!r} has no tokenizer.json")
    try:
        hf = HFTokenizer.from_file(tok_path)
    except Exception as e:  # the Rust side raises a bare Exception for any parse failure
        raise TokenizerLoadError(f"cannot load {tok_path}: {e}") from e
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    template = None
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if _pick_chat_template(config.get("chat_template")) is None and os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerLoadError(f"cannot read {jinja_path}: {e}") from e
    try:
        return Tokenizer(hf, config, chat_template=template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerLoadError(f"the chat template of {model_dir!r} does not compile: {e}") from e
