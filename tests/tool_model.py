"""Test models that speak DeepSeek-V3's tool-call format.

``TOOL_TEMPLATE`` renders conversations the way DeepSeek-V3's published chat template does
(system prompts first, ``<｜User｜>``/``<｜Assistant｜>`` turns, assistant tool calls as
``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```
<｜tool▁call▁end｜>...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>``, tool results inside
``<｜tool▁outputs▁begin｜>...<｜tool▁outputs▁end｜>``) and, like vLLM's DeepSeek-V3 tool template,
lists the ``tools`` in the system prompt (DeepSeek's own template leaves that to the caller).

``use_tool_template(model_dir)`` installs it in a model directory's tokenizer_config.json;
``add_tool_tokens(model_dir)`` also makes the nine markers special tokens of ``tokenizer.json``,
replacing the last nine ids of the vocabulary so the model's vocabulary size still fits.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer

TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>"]

TOOL_TEMPLATE = """{{ bos_token }}
{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}
{%- if tools %}{{ '\\n\\n## Tools\\nCall functions with the tool-call format. Functions:' }}
{%- for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{% endif %}
{%- set ns = namespace(in_outputs=false, first_output=true) %}
{%- for m in messages %}
{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{% set ns.in_outputs = false %}
{%- elif m['role'] == 'assistant' and m['tool_calls'] is defined %}
{%- if ns.in_outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.in_outputs = false %}{% endif %}
{{- '<｜Assistant｜>' + (m['content'] or '') + '<｜tool▁calls▁begin｜>' }}
{%- for c in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}
{{- '<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] + '\\n```json\\n' + c['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}
{%- endfor %}{{ '<｜tool▁calls▁end｜>' + eos_token }}{% set ns.first_output = true %}
{%- elif m['role'] == 'assistant' %}
{%- if ns.in_outputs %}{{ '<｜tool▁outputs▁end｜>' + m['content'] + eos_token }}{% set ns.in_outputs = false %}
{%- else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}
{%- elif m['role'] == 'tool' %}
{%- if ns.first_output %}{{ '<｜tool▁outputs▁begin｜>' }}{% else %}{{ '\\n' }}{% endif %}
{{- '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}{% set ns.in_outputs = true %}{% set ns.first_output = false %}
{%- endif %}
{%- endfor %}
{%- if ns.in_outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"""


def use_tool_template(model_dir: str) -> str:
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = TOOL_TEMPLATE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return model_dir


def add_tool_tokens(model_dir: str) -> str:
    """Make the tool markers special tokens with the vocabulary's last ids (the size stays the same)."""
    path = os.path.join(model_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    size = Tokenizer.from_str(json.dumps(data)).get_vocab_size(with_added_tokens=True)
    vocab = data["model"]["vocab"]
    freed = set(range(size - len(TOOL_TOKENS), size))
    data["model"]["vocab"] = {t: i for t, i in vocab.items() if i not in freed}
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if "".join(m if isinstance(m, list) else m.split(" ")) in data["model"]["vocab"]]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] not in freed]
    for i, token in zip(sorted(freed), TOOL_TOKENS):
        data["added_tokens"].append(_added_token(i, token))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    tok = Tokenizer.from_file(path)
    assert [tok.token_to_id(t) for t in TOOL_TOKENS] == sorted(freed), "tool tokens did not take the freed ids"
    assert tok.get_vocab_size(with_added_tokens=True) == size
    return use_tool_template(model_dir)


def _added_token(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
