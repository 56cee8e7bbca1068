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

Set ``CKPTCTL_REALCKPT_CACHE=/some/dir`` to keep the written checkpoints between sessions
(the writer is idempotent: a complete earlier write with the same parameters is reused).
"""

from __future__ import annotations

import os
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
    written = write_megatron_components([(root / name / "policy", kw) for name, kw in MEGATRON_VARIANTS.items()])
    seconds = time.monotonic() - t0
    return MegatronCkpts({n: MegatronCkpt(n, c) for n, c in zip(MEGATRON_VARIANTS, written)}, seconds)


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
        _save_export(root / name, arch, dtype, tie, shard)
        out[name] = HfExport(name, root / name, dtype, shard is not None)
    return out
