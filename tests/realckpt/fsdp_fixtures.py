"""Session fixtures: real FSDP checkpoints, written once per test session (pytest plugin).

Every variant below and a small SkyRL tree are written by ONE ``write_fsdp_components``
launcher call (the torch/transformers import is paid once), cached through
:func:`realckpt.fsdp_writer.cached` (so ``CKPTCTL_TEST_CACHE`` makes them persist across
sessions).  Treat everything as read-only: copy (``shutil.copytree``) before mutating.

Fixtures
--------
``fsdp_ckpts`` (session) -> ``{name: FsdpComponent}`` for every name in :data:`FSDP_VARIANTS`;
    ``.path`` is the component directory (``<name>/policy``), ``.reference_dir`` its reference
    data (``reference_full_state.safetensors``, ``reference_full_optim.safetensors``,
    ``reference_meta.json``, ...), ``.meta`` the parsed ``reference_meta.json``.
``fsdp_tree`` (session) -> Path of a SkyRL tree: ``global_step_{2,4}/{policy,critic}`` (W=2,
    FSDP2), ``data.pt``, ``trainer_state.pt`` (OmegaConf config, as 0.3.1), pointer ``4``.
    Reference data of its components lies OUTSIDE the tree, in ``<root>.reference/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realckpt import fsdp_writer as fw

#: name -> keyword arguments of ``write_fsdp_component`` (comment: what the variant exercises).
FSDP_VARIANTS: dict[str, dict] = {
    # single GPU: plain tensors, no mesh (layout "plain")
    "w1": dict(world_size=1),
    # FSDP2 on a 1-rank mesh: DTensors with one (full) shard
    "w1_mesh": dict(world_size=1, w1_plain=False, seed=11),
    # the common case: 1-D ("fsdp",) mesh, even shards (vocab 1000 / 2)
    "w2": dict(world_size=2),
    # uneven shards (1000 -> 334/334/332, 64 -> 22/22/20), tied embeddings, qwen2 q/k/v biases
    "w3_tied": dict(world_size=3, arch="qwen2", tie=True, seed=3),
    # critic at W=3: value_head.weight [1, 64] -> rows 1, 0, 0 (EMPTY shards on ranks 1, 2);
    # persistent buffers mean/std/inv_freq replicated on every rank
    "critic_w3": dict(world_size=3, critic=True, seed=7),
    # HSDP: 4 processes, mesh (2, 2) ("ddp", "fsdp"), placements (Replicate(), Shard(0))
    "hsdp": dict(world_size=4, mesh="hsdp", replicas=2, critic=True, seed=5),
    # the documented layout: model_state.pt / optimizer_state.pt / lr_scheduler_state.pt (W=1)
    "documented": dict(world_size=1, layout="documented"),
    # verl naming: fsdp_config.json {"FSDP_version": 2, ...}, extra_state {lr_scheduler, rng}
    "verl": dict(world_size=2, config_variant="verl"),
    # FSDP1 with a device mesh: DTensor model state, flat-parameter optimizer shards
    "fsdp1": dict(world_size=2, strategy="fsdp"),
    # FSDP1 without a mesh: legacy ShardedTensor (needs a process group to unpickle for real),
    # uneven + empty shards, no fsdp_config.json (W from the file names)
    "fsdp1_sharded": dict(world_size=3, strategy="fsdp", fsdp1_tensor="sharded_tensor", critic=True,
                          config_variant="none"),
    # LoRA (PEFT) policy, FSDP2 at W=2, as SkyRL trains it: peft names (base_model.model. prefix,
    # base_layer / lora_A.default / lora_B.default), frozen base weights without optimizer state,
    # lora_adapter/ (adapter_config.json + adapter_model.safetensors); per-module rank and alpha;
    # task_type CAUSAL_LM as SkyRL's HFModelWrapper sets it (PeftModelForCausalLM, same keys)
    "lora_w2": dict(world_size=2, arch="qwen2", seed=21,
                    lora={"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"],
                          "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"o_proj": 16}}),
    # LoRA on one GPU (plain tensors): rsLoRA scaling, an embedding adapter (lora_embedding_A/B),
    # lm_head in modules_to_save (original_module + modules_to_save.default); no task_type (null)
    "lora_w1": dict(world_size=1, arch="llama", seed=22,
                    lora={"r": 4, "lora_alpha": 16, "use_rslora": True,
                          "target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    # Qwen3-MoE (4 experts, top-2, q/k norm), FSDP2 at W=2: transformers 5 holds the routed experts
    # fused, so the rank files hold mlp.experts.gate_up_proj [E, 2F, H] / down_proj [E, H, F] as
    # DTensors sharded on the EXPERT axis (2 experts per rank); router mlp.gate.weight [E, H]
    "qwen3moe_w2": dict(world_size=2, arch="qwen3_moe", vocab=256, hidden=64, layers=2, heads=4, kv_heads=2,
                        intermediate=96, seed=31),
}

TREE_STEPS = (2, 4)
TREE_KW = dict(with_critic=True, world_size=2)
CACHE_NAME = "fsdp_ckpts"


def build_fsdp_fixtures(d: Path) -> None:
    """Write every variant (``d/<name>/policy``) and the tree (``d/ckpts``) with one launcher."""
    jobs = [(d / name / "policy", kw) for name, kw in FSDP_VARIANTS.items()]
    jobs += fw.fsdp_tree_jobs(d / "ckpts", TREE_STEPS, **TREE_KW)
    fw.write_fsdp_components(jobs)
    fw.finish_fsdp_tree(d / "ckpts", TREE_STEPS, pointer=4, config_kind="omegaconf")


def load_components(root: Path) -> dict[str, fw.FsdpComponent]:
    out = {}
    for name in FSDP_VARIANTS:
        path = root / name / "policy"
        ref = root / name / "policy.reference"
        out[name] = fw.FsdpComponent(path, ref, json.loads((ref / "reference_meta.json").read_text()))
    return out


@pytest.fixture(scope="session")
def fsdp_ckpts_root() -> Path:
    """The directory holding every variant and the tree (built once, see module docstring)."""
    return fw.cached(CACHE_NAME, build_fsdp_fixtures)


@pytest.fixture(scope="session")
def fsdp_ckpts(fsdp_ckpts_root) -> dict[str, fw.FsdpComponent]:
    return load_components(fsdp_ckpts_root)


@pytest.fixture(scope="session")
def fsdp_tree(fsdp_ckpts_root) -> Path:
    return fsdp_ckpts_root / "ckpts"
