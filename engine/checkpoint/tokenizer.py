"""A small byte-level BPE tokenizer with DeepSeek-V3's special tokens and chat format.

``train_bpe_tokenizer`` writes the two files a Hugging Face checkpoint carries:
``tokenizer.json`` (the ``tokenizers`` model) and ``tokenizer_config.json``
(special tokens and the Jinja ``chat_template``). Ids 0 and 1 are bos and eos,
as in DeepSeek-V3. Like DeepSeek's files, the tokenizer prepends bos when asked
for special tokens (``add_bos_token``) while the chat template writes bos itself,
so a rendered chat prompt is encoded with ``add_special_tokens=False``.

The default corpus is the Python standard library's own source: it exists on
every machine, needs no network, and is read in a fixed order.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Order fixes the ids: bos 0, eos 1, as in DeepSeek-V3's tokenizer.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
BOS_ID, EOS_ID = 0, 1

# DeepSeek-V3's format: bos, system prompts joined by blank lines, then
# <｜User｜>{user} and <｜Assistant｜>{reply}<｜end▁of▁sentence｜> turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if not ns.first %}{% set ns.system = ns.system + '\\n\\n' %}{% endif -%}"
    "{%- set ns.system = ns.system + message['content'] -%}{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_corpus_files(limit_bytes: int | None = None) -> list[str]:
    """The standard library's ``.py`` files (no site-packages, no test dirs), sorted by path.

    With ``limit_bytes``, the shortest sorted prefix whose sizes add up to at least that many bytes.
    """
    root = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort()
    if limit_bytes is None:
        return files
    chosen: list[str] = []
    total = 0
    for f in files:
        if total >= limit_bytes:
            break
        chosen.append(f)
        total += os.path.getsize(f)
    return chosen


def _lines(files: list[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def _placeholder(i: int) -> str:
    # DeepSeek-V3 fills its vocabulary's tail with tokens of this form.
    return f"<｜place▁holder▁no▁{i}｜>"


def train_bpe_tokenizer(files: list[str], vocab_size: int, out_dir: str, model_max_length: int = 4096):
    """Train a byte-level BPE of exactly ``vocab_size`` tokens on ``files``; write it to ``out_dir``.

    Deterministic for the same files. A corpus too small to learn enough merges is
    topped up with placeholder special tokens, so the size is always the one asked for.
    Returns the ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below {minimum} (special tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(files), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([_placeholder(i) for i in range(missing)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(model_max_length), f, indent=2, ensure_ascii=False)
    return tok


def _tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
