"""Session fixtures: real megatron checkpoints, written once per test session (pytest plugin).

``megatron_ckpts`` -- every variant of :data:`MEGATRON_VARIANTS`, written by megatron-core's own
``dist_checkpointing.save`` with ONE :func:`~realckpt.megatron_writer.write_megatron_components`
call (one launcher, megatron-core imported once; ~25 s for all seven on 2 CPU cores). Only
the first test that asks for it pays; ``megatron_ckpts["tp2"]`` is a :class:`MegatronCkpt`.

``hf_export`` -- HF export directories (``save_pretrained`` of :mod:`realckpt.tiny_models`, with
the tokenizer; no megatron needed) keyed by name: ``"single"`` (fp32 Llama, one
``model.safetensors``), ``"single_bf16"`` (the same in bf16), ``"sharded"`` (fp32 tied Qwen2,
``max_shard_size`` small enough for five shards + ``model.safetensors.index.json``) and
``"sharded_bf16"`` (the same model in bf16, three shards). The Megatron variants carry their
own HF copies too (``megatron_ckpts[name].reference_hf_dir``).

``megatron_moe_ckpts`` -- every variant of :data:`MEGATRON_MOE_VARIANTS` (Qwen3-MoE TP2xEP2 and
PP2xEP2, Mixtral EP2, DeepSeek-V3 EP2 with and without q-LoRA), one launcher, same
:class:`MegatronCkpt` type (plus ``reference_logits_file``).  ``megatron_moe_tree`` -- a SkyRL
MoE run (two steps) for whole-run operations.

Set ``CKPTCTL_REALCKPT_CACHE=/some/dir`` to keep the written checkpoints between sessions
(the writer is idempotent: a complete earlier write with the same parameters is reused).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

#: name -> write_megatron_component kwargs (documented facts of each in the writer's docstrings)
MEGATRON_VARIANTS: dict[str, dict[str, Any]] = {
    # TP=2, stacked decoder.layers.* keys, DistributedOptimizer fully_reshardable, rng in common.pt
    "tp2": dict(tp=2),
    # TP=2 x PP=2: 4 ranks, 4 layers (2 per stage)
    "tp2pp2": dict(tp=2, pp=2),
    # per-layer decoder.layers.{i}.* keys (non_homogeneous_layers)
    "perlayer": dict(tp=2, per_layer_keys=True),
    # Qwen2 (QKV bias), tied embeddings, verl's dist_ckpt/ nesting
    "qwen2_verl": dict(tp=2, arch="qwen2", tie_embeddings=True, verl_nesting=True),
    # PP=2 with tied embeddings, non-distributed optimizer, Megatron-LM's sharded rng_state objects
    "tiepp2_fp32opt": dict(tp=1, pp=2, tie_embeddings=True, optimizer_format="fp32", rng_format="sharded"),
    # DP=2 fully parallel save (both DP ranks write), bf16 weights
    "dp2_bf16": dict(tp=1, dp=2, params_dtype="bfloat16"),
    # PP=2 x DP=2 fully parallel save: DP ranks of a stage share its writes (PP inference)
    "pp2dp2": dict(tp=1, pp=2, dp=2),
}

#: name -> write_megatron_component kwargs of the REAL megatron-core MoE checkpoints (all written
#: with ONE launcher by the ``megatron_moe_ckpts`` fixture; ~15 s on 2 CPU cores).  Every variant:
#: 2 layers per pipeline stage, hidden 64, 4 heads, 4 routed experts, top-2, moe_ffn 32, vocab 256,
#: 2 AdamW steps, fully_reshardable optimizer state of megatron's ChainedOptimizer (dense params
#: ``chained_0.``, expert params ``chained_1.``), etp = tp (SkyRL), expert DP 1.
MEGATRON_MOE_VARIANTS: dict[str, dict[str, Any]] = {
    # Qwen3-MoE (q/k norm, all layers MoE -> stacked decoder.layers.* keys), TP2 x EP2: 4 ranks
    "qwen3moe_tp2ep2": dict(arch="qwen3_moe", tp=2, ep=2),
    # Qwen3-MoE, PP2 x EP2: 4 ranks, 4 layers (2 per stage)
    "qwen3moe_pp2ep2": dict(arch="qwen3_moe", pp=2, ep=2),
    # Mixtral, EP2: 2 ranks
    "mixtral_ep2": dict(arch="mixtral", ep=2),
    # DeepSeek-V3 architecture, EP2: MLA with q-LoRA, layer 0 dense -> per-layer decoder.layers.{i}.*
    # keys, 1 shared expert, sigmoid router with expert bias, 2 groups / top-1 group, scaling 2.5
    "dsv3_ep2": dict(arch="deepseek_v3", ep=2),
    # the same without q-LoRA (linear_q_proj, like Moonlight)
    "dsv3_noqlora_ep2": dict(arch="deepseek_v3", ep=2, q_lora_rank=None),
}


@dataclass
class MegatronCkpt:
    """One written component plus cached access to its reference data."""

    name: str
    component: Any  # realckpt.megatron_writer.MegatronComponent
    _tensors: dict | None = field(default=None, repr=False)

    @property
    def out_dir(self) -> Path:  # the component dir (SkyRL policy/)
        return self.component.out_dir

    @property
    def ckpt_dir(self) -> Path:  # where .metadata lives (out_dir or out_dir/dist_ckpt)
        return self.component.ckpt_dir

    @property
    def reference_dir(self) -> Path:
        return self.component.reference_dir

    @property
    def reference_hf_dir(self) -> Path:
        return self.component.reference_hf_dir

    @property
    def hf_dir(self) -> Path:  # out_dir/huggingface (config + tokenizer, no weights)
        return self.component.hf_dir

    @property
    def reference_tensors_file(self) -> Path:
        return self.component.reference_tensors_file

    @property
    def reference_logits_file(self) -> Path:
        """MoE variants: ``input_ids`` [2, 12] and the HF model's fp32 ``logits``."""
        return self.component.reference_dir / "reference_logits.safetensors"

    @property
    def params(self) -> dict:
        return self.component.params

    @property
    def info(self) -> dict:
        return self.component.info

    def reference_tensors(self) -> dict:
        """checkpoint key -> full global tensor (model + optimizer), loaded once."""
        if self._tensors is None:
            self._tensors = self.component.reference_tensors()
        return self._tensors

    def __getitem__(self, key: str) -> Any:  # ckpt["ckpt_dir"] works too
        return getattr(self, key)


class MegatronCkpts(Mapping):
    def __init__(self, items: dict[str, MegatronCkpt], seconds: float):
        self._items = items
        self.seconds = seconds

    def __getitem__(self, name: str) -> MegatronCkpt:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _cache_root(tmp_path_factory, name: str) -> Path:
    cache = os.environ.get("CKPTCTL_REALCKPT_CACHE")
    if cache:
        root = Path(cache) / name
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp(name)


@contextmanager
def building(root: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the cache directory ``root`` while a fixture fills it, so test
    processes sharing the cache (pytest-xdist workers) write each checkpoint once: the others
    wait, then find it complete."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require_megatron() -> None:
    """Skip without megatron-core, WITHOUT importing it here: ``import megatron.core`` registers
    torch safe globals process-wide (argparse.Namespace, PosixPath, BytesIO, ... via
    ``megatron.core.safe_globals``), which would widen every ``torch.load(weights_only=True)``
    in this test process -- ckptctl's own safe loading included. The writer runs megatron in
    child processes."""
    import importlib.util

    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed")


@pytest.fixture(scope="session")
def megatron_ckpts(tmp_path_factory) -> MegatronCkpts:
    _require_megatron()
    from realckpt.megatron_writer import write_megatron_components

    root = _cache_root(tmp_path_factory, "megatron_ckpts")
    t0 = time.monotonic()
    with building(root):
        written = write_megatron_components([(root / name / "policy", kw) for name, kw in MEGATRON_VARIANTS.items()])
    seconds = time.monotonic() - t0
    return MegatronCkpts({n: MegatronCkpt(n, c) for n, c in zip(MEGATRON_VARIANTS, written)}, seconds)


@pytest.fixture(scope="session")
def megatron_moe_ckpts(tmp_path_factory) -> MegatronCkpts:
    """Every variant of :data:`MEGATRON_MOE_VARIANTS` (name -> :class:`MegatronCkpt`), written by
    megatron-core's own ``dist_checkpointing.save`` with one launcher, once per session
    (reused across sessions with ``CKPTCTL_REALCKPT_CACHE``).  Each reference dir also holds
    ``reference_logits.safetensors`` (``input_ids`` [2, 12], the HF model's fp32 ``logits``)."""
    _require_megatron()
    pytest.importorskip("transformers")
    from realckpt.megatron_writer import write_megatron_components

    root = _cache_root(tmp_path_factory, "megatron_moe_ckpts")
    t0 = time.monotonic()
    with building(root):
        written = write_megatron_components(
            [(root / name / "policy", kw) for name, kw in MEGATRON_MOE_VARIANTS.items()])
    seconds = time.monotonic() - t0
    return MegatronCkpts({n: MegatronCkpt(n, c) for n, c in zip(MEGATRON_MOE_VARIANTS, written)}, seconds)


#: the MoE SkyRL tree of the ``megatron_moe_tree`` fixture (write_megatron_tree keywords)
MEGATRON_MOE_TREE = dict(steps=(1, 2), pointer=2, arch="qwen3_moe", tp=2, ep=2)


@pytest.fixture(scope="session")
def megatron_moe_tree(tmp_path_factory):
    """A SkyRL Megatron MoE run (``realckpt.megatron_writer.MegatronTree``): Qwen3-MoE TP2 x EP2,
    ``global_step_{1,2}/policy`` (+ ``trainer_state.pt`` whose megatron_config names EP 2 / ETP 2,
    ``data.pt``), pointer 2; references in ``<root>.reference/``.  Its own launcher (~12 s cold)."""
    _require_megatron()
    pytest.importorskip("transformers")
    from realckpt.megatron_writer import write_megatron_tree

    root = _cache_root(tmp_path_factory, "megatron_moe_tree")
    kw = dict(MEGATRON_MOE_TREE)
    with building(root):
        return write_megatron_tree(root / "ckpts", kw.pop("steps"), kw.pop("pointer"), **kw)


@dataclass(frozen=True)
class HfExport:
    name: str
    path: Path
    dtype: str
    sharded: bool


def _save_export(out: Path, arch: str, dtype: str, tie: bool, max_shard_size: str | None) -> None:
    import torch

    from realckpt import tiny_models

    if (out / "config.json").is_file():
        return  # written earlier (CKPTCTL_REALCKPT_CACHE)
    model = tiny_models.make_model(arch, seed=3, tie=tie)
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    tiny_models.make_tokenizer().save_pretrained(str(out))


#: name -> (arch, dtype, tied, max_shard_size); None = transformers' default (one file here)
HF_EXPORTS = {
    "single": ("llama", "float32", False, None),
    "single_bf16": ("llama", "bfloat16", False, None),
    "sharded": ("qwen2", "float32", True, "100KB"),  # 5 shards + index
    "sharded_bf16": ("qwen2", "bfloat16", True, "100KB"),  # 3 shards + index
}


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory) -> dict[str, HfExport]:
    """HF export dirs (real ``save_pretrained`` output), single-file and sharded, fp32 and bf16."""
    pytest.importorskip("transformers")
    root = _cache_root(tmp_path_factory, "hf_exports")
    out = {}
    for name, (arch, dtype, tie, shard) in HF_EXPORTS.items():
        with building(root):
            _save_export(root / name, arch, dtype, tie, shard)
        out[name] = HfExport(name, root / name, dtype, shard is not None)
    return out
