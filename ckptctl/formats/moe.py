"""What a mixture-of-experts model is made of, from its HF ``config.json`` and its tensor names.

The same facts whatever the backend: routed experts and how many each token uses, the router
(softmax, or sigmoid with an expert bias: DeepSeek-V3, GLM), shared experts, how many layers are
MoE, and the parameters in routed experts beside the rest (dense), with the parameters one token
uses. Routed-expert tensors are recognised by name: Megatron's ``mlp.experts.*``, transformers 5's
fused ``mlp.experts.gate_up_proj`` / ``down_proj``, and saved per-expert names
(``mlp.experts.{e}.``, Mixtral's ``block_sparse_moe.experts.{e}.``). Imports nothing heavy.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from ckptctl.formats.base import TensorInfo

#: config.json names of the routed-expert count (see mcore_to_hf._EXPERT_COUNT_KEYS)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_ROUTED_RE = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.experts\.")
_SIGMOID_TYPES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")


def num_routed_experts(config: Mapping[str, Any]) -> int:
    return next((int(config[k]) for k in EXPERT_COUNT_KEYS if config.get(k)), 0)


def is_routed_expert(name: str) -> bool:
    return bool(_ROUTED_RE.search(name)) and ".shared_expert" not in name


def _moe_layer_count(config: Mapping[str, Any]) -> int | None:
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None
    dense = set(config.get("mlp_only_layers") or ())
    first_dense = int(config.get("first_k_dense_replace") or 0)
    step = int(config.get("decoder_sparse_step") or config.get("moe_layer_freq") or 1)
    count = 0
    for i in range(layers):
        if i in dense or i < first_dense:
            continue
        count += ((i + 1) % step == 0) if "decoder_sparse_step" in config else (i % step == 0)
    return count


def moe_summary(config: Mapping[str, Any] | None, tensors: Iterable[TensorInfo]) -> dict[str, Any] | None:
    """The MoE facts of a model (``tensors``: its model tensors), or None for a dense model."""
    config = config or {}
    experts = num_routed_experts(config)
    routed = dense = 0
    for t in tensors:
        if is_routed_expert(t.name):
            routed += t.numel
        else:
            dense += t.numel
    if not experts and not routed:
        return None
    out: dict[str, Any] = {"routed_experts": experts or None, "experts_per_token": config.get("num_experts_per_tok")}
    sigmoid = config.get("scoring_func") == "sigmoid" or config.get("model_type") in _SIGMOID_TYPES
    out["router"] = "sigmoid, expert bias" if sigmoid else "softmax"
    shared = config.get("n_shared_experts") or (1 if config.get("shared_expert_intermediate_size") else 0)
    out["shared_experts"] = int(shared or 0)
    out["moe_layers"] = _moe_layer_count(config)
    out["expert_ffn"] = config.get("moe_intermediate_size") or config.get("intermediate_size")
    out["expert_parameters"] = routed
    out["dense_parameters"] = dense
    top_k = config.get("num_experts_per_tok")
    if experts and isinstance(top_k, int):
        out["active_parameters"] = dense + routed * top_k // experts
    if not experts:
        out["note"] = "config.json names no routed-expert count"
    return out
