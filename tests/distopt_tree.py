"""SkyRL trees around the REAL megatron-core DistributedOptimizer checkpoints (issue #10).

:mod:`realckpt.distopt_writer` writes the raw ``dist_checkpointing`` directories (model +
optimizer state in ``dp_reshardable`` or ``fully_reshardable``, by megatron-core 0.16.1 itself);
:func:`skyrl_tree` places a copy of one as SkyRL lays it out (``global_step_N/policy/``, the
pointer file, ``trainer_state.pt`` holding a SkyRL-shaped config for the layout the checkpoint
was written at, unless told another) plus a ``huggingface/config.json`` of the same model
(Llama for the dense model, Qwen3-MoE for the MoE one), so every command can run on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


def distopt_fixtures(tmp_path_factory) -> dict[str, Path]:
    """The fixture directories by name (built once, cached under ``$CKPTCTL_REALCKPT_CACHE``)."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from realckpt.distopt_writer import write_distopt_fixtures

    from realckpt.megatron_fixtures import building

    cache = os.environ.get("CKPTCTL_REALCKPT_CACHE")
    out = Path(cache) / "distopt" if cache else tmp_path_factory.mktemp("distopt")
    with building(out):
        return write_distopt_fixtures(out)


def job_of(fixture: Path) -> dict:
    """The writer's job parameters (layout, model dims, format) of one fixture."""
    return json.loads((fixture / "params.json").read_text())["params"]["job"]


def hf_config(job: dict) -> dict:
    """An HF config.json of the mcore model the job built (RMSNorm, SwiGLU, no biases, RoPE)."""
    m = job["model"]
    config = {
        "hidden_size": m["hidden"], "num_hidden_layers": m["num_layers"], "num_attention_heads": m["heads"],
        "num_key_value_heads": m["kv_heads"], "head_dim": m.get("head_dim") or m["hidden"] // m["heads"],
        "intermediate_size": m["ffn"], "vocab_size": m["padded_vocab"], "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rotary_base"], "max_position_embeddings": m["max_seq"], "tie_word_embeddings": m["tie"],
        "attention_bias": m["qkv_bias"], "torch_dtype": job["params_dtype"], "hidden_act": "silu",
    }
    moe = m.get("moe")
    if moe is None:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **config,
            "moe_intermediate_size": moe["moe_ffn"], "num_experts": moe["num_experts"],
            "num_experts_per_tok": moe["topk"], "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "output_router_logits": False, "use_sliding_window": False}


def skyrl_config(job: dict, *, tp: int | None = None, pp: int | None = None, ep: int | None = None,
                 etp: int | None = None, gpus: int | None = None, ckpt_path: str = "/ckpts") -> dict:
    """SkyRL's config (the keys its Megatron backend reads) for the job's layout, or the one given."""
    return {
        "trainer": {
            "strategy": "megatron", "ckpt_path": ckpt_path, "ckpt_interval": 1, "resume_mode": "latest",
            "placement": {"colocate_all": True, "policy_num_nodes": 1,
                          "policy_num_gpus_per_node": job["world_size"] if gpus is None else gpus},
            "policy": {
                "model": {"path": "tiny/mcore-gpt"},
                "megatron_config": {
                    "tensor_model_parallel_size": job["tp"] if tp is None else tp,
                    "pipeline_model_parallel_size": job["pp"] if pp is None else pp,
                    "context_parallel_size": 1,
                    "expert_model_parallel_size": job["ep"] if ep is None else ep,
                    "expert_tensor_parallel_size": job["etp"] if etp is None else etp,
                    "dist_ckpt_optim_fully_reshardable": job["format"] == "fully_reshardable",
                },
            },
        },
    }


def skyrl_tree(fixture: Path, root: Path, *, step: int = 2, config: dict | None = None,
               config_kind: str = "dict") -> Path:
    """A SkyRL tree at ``root`` holding a COPY of ``fixture``'s checkpoint as ``global_step_{step}/policy``
    (plus ``huggingface/config.json``), ``trainer_state.pt`` (``config``: default the job's own
    layout; ``config_kind="omegaconf"`` pickles it as an OmegaConf DictConfig, as SkyRL 0.3.1
    does) and the pointer. Returns the step directory."""
    import torch

    job = job_of(fixture)
    step_dir = root / f"global_step_{step}"
    policy = step_dir / "policy"
    shutil.copytree(fixture / "checkpoint", policy)
    (policy / "huggingface").mkdir()
    (policy / "huggingface" / "config.json").write_text(json.dumps(hf_config(job), indent=1))
    cfg = config if config is not None else skyrl_config(job, ckpt_path=str(root))
    if config_kind == "omegaconf":
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(cfg)
    torch.save({"global_step": step, "config": cfg}, step_dir / "trainer_state.pt")
    (root / "latest_ckpt_global_step.txt").write_text(str(step))
    return step_dir
