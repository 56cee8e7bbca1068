"""Build SkyRL-shaped trees for the management-command tests (list, prune, resolve-resume).

These commands decide everything from names, sizes and the pointer file and never open a
tensor file, so the files here are small placeholders of a known size. Format tests use the
real checkpoints written by torch and megatron-core (``realckpt``).
"""

from __future__ import annotations

import json
import os


def _write(path: str, size: int = 64, data: bytes | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if data is not None else b"x" * size)


def fsdp_step(root: str, step: int, *, world: int = 2, critic: bool = False, missing: tuple[str, ...] = (),
              zero: tuple[str, ...] = (), trainer_state: bool = True, data: bool = True,
              optimizer: bool = True, size: int = 100) -> str:
    """A SkyRL FSDP step: per-rank model/optim/extra_state files, fsdp_config.json, huggingface/.

    ``missing`` and ``zero`` name files (relative to the step dir) to leave out or make empty.
    """
    step_dir = os.path.join(root, f"global_step_{step}")
    files = []
    for comp in ("policy", "critic") if critic else ("policy",):
        kinds = ("model", "optim", "extra_state") if optimizer else ("model", "extra_state")
        for rank in range(world):
            files += [f"{comp}/{k}_world_size_{world}_rank_{rank}.pt" for k in kinds]
        files += [f"{comp}/huggingface/config.json", f"{comp}/huggingface/tokenizer.json"]
    if trainer_state:
        files.append("trainer_state.pt")
    if data:
        files.append("data.pt")
    for rel in files:
        if rel in missing:
            continue
        _write(os.path.join(step_dir, rel), 0 if rel in zero else size)
    for comp in ("policy", "critic") if critic else ("policy",):
        if f"{comp}/fsdp_config.json" not in missing:
            _write(os.path.join(step_dir, comp, "fsdp_config.json"),
                   data=json.dumps({"fsdp_strategy": "fsdp2", "world_size": world}).encode())
    return step_dir


def megatron_step(root: str, step: int, *, ranks: int = 2, nested: bool = False, metadata_json: bool = True,
                  size: int = 100) -> str:
    """A SkyRL Megatron step (names as dist_checkpointing's torch_dist strategy writes them)."""
    step_dir = os.path.join(root, f"global_step_{step}")
    base = os.path.join(step_dir, "policy", "dist_ckpt" if nested else "")
    for rank in range(ranks):
        for i in range(2):
            _write(os.path.join(base, f"__{rank}_{i}.distcp"), size)
    _write(os.path.join(base, ".metadata"), size)
    _write(os.path.join(base, "common.pt"), size)
    if metadata_json:
        _write(os.path.join(base, "metadata.json"), data=json.dumps({
            "sharded_backend": "torch_dist", "sharded_backend_version": 1,
            "common_backend": "torch", "common_backend_version": 1}).encode())
    _write(os.path.join(step_dir, "policy", "huggingface", "config.json"), size)
    _write(os.path.join(step_dir, "trainer_state.pt"), size)
    _write(os.path.join(step_dir, "data.pt"), size)
    return step_dir


def documented_step(root: str, step: int, *, world: int = 4) -> str:
    """The single-file layout SkyRL's documentation shows."""
    step_dir = os.path.join(root, f"global_step_{step}")
    for name in ("model_state.pt", "optimizer_state.pt", "lr_scheduler_state.pt"):
        _write(os.path.join(step_dir, "policy", name))
    _write(os.path.join(step_dir, "policy", "fsdp_config.json"),
           data=json.dumps({"fsdp_strategy": "fsdp", "world_size": world}).encode())
    _write(os.path.join(step_dir, "trainer_state.pt"))
    return step_dir


def export_step(root: str, step: int, *, shards: int = 1, missing_shard: int | None = None) -> str:
    """An HF export: ``{export_path}/global_step_N/policy/`` with safetensors and config."""
    comp = os.path.join(root, f"global_step_{step}", "policy")
    _write(os.path.join(comp, "config.json"), data=b"{}")
    if shards == 1:
        _write(os.path.join(comp, "model.safetensors"))
    else:
        for i in range(1, shards + 1):
            if i != missing_shard:
                _write(os.path.join(comp, f"model-{i:05d}-of-{shards:05d}.safetensors"))
        _write(os.path.join(comp, "model.safetensors.index.json"), data=b"{}")
    return comp


def pointer(root: str, value) -> None:
    """``latest_ckpt_global_step.txt``: a bare integer without a newline, like SkyRL writes."""
    _write(os.path.join(root, "latest_ckpt_global_step.txt"), data=str(value).encode())
