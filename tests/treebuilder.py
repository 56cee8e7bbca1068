"""Build SkyRL-shaped trees for the management-command tests (list, prune, resolve-resume).

These commands decide from names, sizes and the pointer file, plus the cheap deep check of the
files they decide on (:mod:`ckptctl.formats.integrity`: a ``.pt`` file's zip directory, a
``.safetensors`` header), and never read a tensor. So the files here are small stand-ins of a
known size that pass that check: ``.pt`` files are well-formed ``torch.save``-style zips (a
``data.pkl`` record, padded to the size asked for, or the smallest such zip when the size asked
for is smaller), ``.safetensors`` files hold one uint8 tensor filling the file. Megatron
``.metadata`` files are placeholders (a deep check calls them unreadable). Format tests use the
real checkpoints written by torch and megatron-core (``realckpt``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile


def torch_zip_bytes(size: int) -> bytes:
    """A ``torch.save``-shaped zip (``archive/data.pkl`` plus a padding record) of exactly
    ``size`` bytes, or the smallest one when ``size`` is smaller than that."""
    def build(pad: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
            zf.writestr("archive/data/0", b"\0" * pad)
        return buf.getvalue()

    smallest = build(0)
    return build(size - len(smallest)) if size > len(smallest) else smallest


def safetensors_bytes(size: int) -> bytes:
    """A safetensors file of exactly ``size`` bytes (at least 128): one uint8 tensor after a
    space-padded header."""
    size = max(size, 128)
    for data_len in range(size, -1, -1):
        header = json.dumps({"w": {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}}).encode()
        room = size - 8 - data_len
        if room >= len(header):
            header += b" " * (room - len(header))
            return len(header).to_bytes(8, "little") + header + b"\1" * data_len
    raise ValueError(size)


def _write(path: str, size: int = 64, data: bytes | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if data is None:
        if size and path.endswith(".pt"):
            data = torch_zip_bytes(size)
        elif size and path.endswith(".safetensors"):
            data = safetensors_bytes(size)
        else:
            data = b"x" * size
    with open(path, "wb") as f:
        f.write(data)


def fsdp_step(root: str, step: int, *, world: int = 2, critic: bool = False, missing: tuple[str, ...] = (),
              zero: tuple[str, ...] = (), trainer_state: bool = True, data: bool = True,
              optimizer: bool = True, size: int = 300) -> str:
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
                  size: int = 300) -> str:
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


def age(root: str, seconds: float) -> None:
    """Set the modification time of every file below ``root`` to ``seconds`` ago."""
    import time

    then = time.time() - seconds
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), (then, then))


def place_runs(backend, workdir: str, builders) -> str:
    """Write the files of each builder (``builder(dir)``) under one new root on ``backend``,
    oldest first, so that modification times tell the runs apart as they would after real
    training: locally each earlier run is aged by an hour more; on S3/GCS, where a file's time
    is its upload time (whole seconds on S3), each later run is uploaded over 3 s later (more
    than ckptctl.tree.MTIME_TOLERANCE), and within a run one step after another and the pointer
    file last, as training writes them (uploaded all at once, a loaded machine once finished
    step 4 over 2 s after step 5, and the run then read as two).
    Returns the root's URL."""
    import time
    import uuid

    from ckptctl.storage import natural_key

    url = backend.new_root()
    for i, build in enumerate(builders):
        local = os.path.join(workdir, f"run-{uuid.uuid4().hex[:8]}")
        os.makedirs(local)
        build(local)
        if backend.kind == "local":
            age(local, 3600 * (len(builders) - i))
            backend.upload_dir(local, url)
            continue
        if i:
            time.sleep(3.1)
        # steps in order, then the top-level files (the pointer); each step's files at once
        paths = [os.path.join(local, name) for name in os.listdir(local)]
        for path in sorted(paths, key=lambda p: (os.path.isfile(p), natural_key(p))):
            dest = backend.join(url, os.path.basename(path))
            if os.path.isdir(path):
                backend.upload_dir(path, dest)
            else:
                with open(path, "rb") as f:
                    backend.put(dest, f.read())
    return url
