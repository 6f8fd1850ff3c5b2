"""How many weight bytes a rank holds, against the share its layout gives it.

The expected share is computed from the checkpoint schema and the layout alone
(not from the model's parameters), so comparing it with what a built and loaded
model holds checks the sharding plan:

* cut over the TP group (``1/tp`` each): the attention head projections
  (``q_proj``/``q_b_proj``, ``kv_b_proj``, ``o_proj``), the dense MLP
  (``gate_proj``/``up_proj``/``down_proj``), every vocabulary matrix
  (``embed_tokens``, ``lm_head``, MTP ``shared_head.head``);
* routed experts: ``(n_routed_experts + num_redundant_experts) / ep`` slots of one
  expert each, per MoE layer (all ``n_routed_experts`` when ``ep == 1``);
* everything else whole on every rank: ``q_a_proj``, ``kv_a_proj_with_mqa``, norms,
  the router (fp32), shared experts, MTP ``eh_proj``;
* an MTP layer's embedding and head not at all where the model holds the main model's
  for them (``DeepseekV3ForCausalLM.share_mtp_vocab``: equal values in the checkpoint).

FP8 models hold each block-FP8 projection as 1-byte e4m3 plus fp32 scales of its
128x128 blocks (of the rank's cut); other tensors are in the model dtype.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from engine.checkpoint.schema import checkpoint_schema, scale_inv_shape
from engine.model.fp8 import FP8

_TP_CUT = re.compile(r"(self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)|layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
                     r"|embed_tokens|lm_head|shared_head\.head)\.weight$")
_CUT_DIM = re.compile(r"(o_proj|down_proj)\.weight$")  # row-parallel: input features cut
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_FP32 = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")


@dataclasses.dataclass(frozen=True)
class WeightShare:
    rank: int
    resident_bytes: int  # parameters this rank holds (tied tensors once)
    expected_bytes: int  # its share by the layout
    full_model_bytes: int  # the same model on one rank


def resident_weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _tensor_bytes(shape: tuple[int, ...], fp8: bool, elem: int) -> int:
    numel = 1
    for n in shape:
        numel *= n
    if not fp8:
        return numel * elem
    rows, cols = scale_inv_shape(shape)
    return numel + rows * cols * 4


def expected_weight_bytes(model, world_size_one: bool = False) -> int:
    """The bytes ``model``'s rank should hold (``world_size_one``: the whole model on one rank)."""
    cfg, layout = model.cfg, model.parallel.layout
    tp = 1 if world_size_one else layout.tp
    slots = cfg.n_routed_experts if world_size_one else layout.num_slots(cfg) // layout.ep
    fp8 = any(p.dtype == FP8 for p in model.parameters())
    elem = torch.tensor([], dtype=model.dtype).element_size()
    total = 0
    expert_bytes: dict[int, int] = {}  # MoE layer -> bytes of one expert
    shared = _shared_mtp_vocab(model)
    for name, spec in checkpoint_schema(cfg, include_mtp=len(model.mtp) > 0).items():
        if name in shared:
            continue
        shape = list(spec.shape)
        if _TP_CUT.search(name):
            shape[1 if _CUT_DIM.search(name) else 0] //= tp
        nbytes = _tensor_bytes(tuple(shape), fp8 and spec.fp8, 4 if _FP32.search(name) else elem)
        m = _EXPERT.match(name)
        if m:
            if int(m.group(2)) == 0:
                expert_bytes[int(m.group(1))] = expert_bytes.get(int(m.group(1)), 0) + nbytes
            continue
        total += nbytes
    return total + slots * sum(expert_bytes.values())


def _shared_mtp_vocab(model) -> set[str]:
    """The MTP tensors the model holds as the main model's (``share_mtp_vocab``): held once."""
    first = model.cfg.num_hidden_layers
    names = set()
    for k, m in enumerate(model.mtp):
        if m.embed_tokens is model.embed_tokens:
            names.add(f"model.layers.{first + k}.embed_tokens.weight")
        if m.shared_head.head is model.lm_head:
            names.add(f"model.layers.{first + k}.shared_head.head.weight")
    return names


def weight_share(model) -> WeightShare:
    return WeightShare(model.parallel.rank, resident_weight_bytes(model), expected_weight_bytes(model),
                       expected_weight_bytes(model, world_size_one=True))
