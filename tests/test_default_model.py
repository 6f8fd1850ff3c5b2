"""The bundled default model, models/pdserve-mini (trained by tools/train_tiny.py).

Checks that it loads with the normal loader (MTP included), stays small, decodes the same
greedy tokens in pdserve and in transformers (fp32 on both sides), actually learned Python
(loss on a fixed snippet far below the uniform ln(vocab)), and that its MTP head agrees with
the main model's own next-token choice.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint.loader import iter_checkpoint_tensors, load_config
from engine.checkpoint.schema import checkpoint_schema
from engine.model.attention import AttentionMetadata
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM

MODEL_DIR = os.environ.get("PDSERVE_MINI_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pdserve-mini")
MAX_BYTES = 30 * 1000**2

# Not copied from the standard library (the held-out check must not be a memorization check).
SNIPPET = '''import os
import sys


def read_lines(path, encoding="utf-8"):
    """Return the lines of a text file, without trailing newlines."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self, name):
        self.name = name
        self.count = 0

    def add(self, value=1):
        if value < 0:
            raise ValueError("value must be non-negative")
        self.count += value
        return self.count

    def __repr__(self):
        return f"{self.__class__.__name__}({self.name!r}, count={self.count})"


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    for path in argv:
        if not os.path.exists(path):
            print("missing:", path, file=sys.stderr)
            continue
        print(len(read_lines(path)))
    return 0
'''

PROMPTS = ["def fibonacci(n):", "import os\n"]


def _need_model():
    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        pytest.fail(f"{MODEL_DIR}: the bundled model is missing (run tools/train_tiny.py --out models/pdserve-mini)")


@pytest.fixture(scope="module")
def model():
    _need_model()
    cfg = load_config(MODEL_DIR)
    m = DeepseekV3ForCausalLM(cfg, dtype=torch.float32, with_mtp=True)
    loaded = m.load_weights(iter_checkpoint_tensors(MODEL_DIR, cfg, torch.float32, progress=False))
    assert loaded == set(checkpoint_schema(cfg))
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    _need_model()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))


def test_size_and_files():
    _need_model()
    files = [f for f in os.listdir(MODEL_DIR) if os.path.isfile(os.path.join(MODEL_DIR, f))]
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in files)
    assert total <= MAX_BYTES, f"{total / 1e6:.1f} MB > 30 MB"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in files


def test_loads_with_mtp(model):
    cfg = model.cfg
    assert cfg.architecture == "DeepseekV3ForCausalLM"
    assert cfg.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    assert any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    # the MTP copies of embedding and head are stored in the official layout
    schema = checkpoint_schema(cfg)
    L = cfg.num_hidden_layers
    assert f"model.layers.{L}.embed_tokens.weight" in schema and f"model.layers.{L}.shared_head.head.weight" in schema


def _snippet_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.encode(SNIPPET, add_special_tokens=True).ids
    assert ids[0] == 0  # bos
    return torch.tensor(ids)


def test_snippet_loss_well_below_uniform(model, tokenizer):
    ids = _snippet_ids(tokenizer)
    n = ids.numel() - 1
    with torch.no_grad():
        h = model(ids[:-1], torch.arange(n), AttentionMetadata.no_cache([n]))
        loss = float(F.cross_entropy(model.compute_logits(h), ids[1:]))
    uniform = math.log(model.cfg.vocab_size)
    assert loss < 0.5 * uniform, f"loss {loss:.3f} vs uniform {uniform:.3f}"


def test_mtp_agrees_with_main_model(model, tokenizer):
    ids = _snippet_ids(tokenizer)
    n = ids.numel() - 1
    pos = torch.arange(n)
    meta = AttentionMetadata.no_cache([n])
    with torch.no_grad():
        h = model(ids[:-1], pos, meta)  # [n, D], h_t for t = 0..n-1
        main_next = model.compute_logits(h).argmax(-1)  # main's guess for token t+1
        mtp = model.mtp[0].logits(model.mtp_forward(0, ids[1:], h, pos, meta)).argmax(-1)  # guess for t+2
    agreement = float((mtp[:-1] == main_next[1:]).float().mean())
    assert agreement >= 0.5, f"MTP agreement {agreement:.3f}"


def test_greedy_tokens_match_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    from engine import LLM, SamplingParams

    llm = LLM(MODEL_DIR, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # 64 tokens on both sides (pdserve: ignore_eos)
    pad = 1  # eos: never in a prompt (bos + text)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        assert pad not in ids
        ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].outputs[0]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                              pad_token_id=pad)
        theirs = out[0, len(ids):].tolist()
        assert len(theirs) == 64
        assert list(ours.token_ids) == theirs, f"{prompt!r}: pdserve {ours.token_ids} vs transformers {theirs}"
