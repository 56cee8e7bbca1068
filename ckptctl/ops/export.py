"""``export-hf``: stream one FSDP or Megatron component into a verified HuggingFace model.

Tensor by tensor: read one global tensor (assembled from its rank pieces or DCP chunks by the
format reader; Megatron's stacked layers one layer at a time), cast if asked, hand it to the
streaming safetensors writer, drop it. Peak memory stays near the largest tensor plus the
writer's buffer, whatever the model size. The writer's commit protocol (temp sibling + rename
locally; weights first, ``config.json`` last on object stores) means a run killed at any
moment leaves nothing that looks like a complete model, and a rerun succeeds.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ckptctl.errors import CkptctlError, NotACheckpointError, UsageError
from ckptctl.formats import open_reader
from ckptctl.formats.base import MODEL, TensorInfo
from ckptctl.storage import Store, open_store
from ckptctl.tree import (FSDP, FSDP_SINGLE, HF, MEGATRON, MODEL_COMPONENTS, POINTER_FILE, STEP_FILES, Component,
                          classify_component, classify_step, parse_step_name, scan_tree)

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
HF_DIR = "huggingface"
# Wrapper prefixes FSDP1 / torch.compile / activation checkpointing leave in state-dict keys.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
# Buffers transformers never saves (non-persistent); older producers left them in state dicts.
_NON_PERSISTENT_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


@dataclass
class ExportSummary:
    source: str
    component: str
    backend: str
    destination: str
    step: int | None = None
    architecture: list[str] = field(default_factory=list)
    dtype: str = "source"  # what --dtype asked for
    dtypes_written: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    shards: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    verified: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _strip_wrappers(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_inside(inner: Store, outer: Store) -> bool:
    if inner.protocol != outer.protocol:
        return False
    a, b = inner.root.rstrip("/"), outer.root.rstrip("/")
    return a == b or a.startswith(b + "/")


def resolve_component(store: Store, component: str) -> tuple[Store, Component, int | None, list[str]]:
    """Find the model component to export in a tree, a step directory or a component directory.

    Returns (store rooted at the component's parent, component, step, notes)."""
    files = store.walk()
    tops = {f.path.split("/", 1)[0] for f in files if "/" in f.path}
    top_files = {f.path for f in files if "/" not in f.path}
    notes: list[str] = []
    if any(parse_step_name(t) is not None for t in tops) or POINTER_FILE in top_files:
        tree = scan_tree(store)
        target = tree.pointer_target
        step = target if target is not None and target.complete else tree.newest_complete
        if step is None:
            raise NotACheckpointError(f"{store.url}: no complete step to export")
        notes.append(f"exporting {step.name}, the " + ("pointer target" if step is target else "newest complete step"))
        parent = store
    elif tops & set(MODEL_COMPONENTS) or top_files & set(STEP_FILES):
        number = parse_step_name(store.name)
        parent = store.parent()
        step = classify_step(parent, store.name, number if number is not None else -1, files)
    else:
        comp = classify_component(store.parent(), store.name, store.name, files)
        if comp.backend == "unknown":
            raise NotACheckpointError(f"{store.url}: not a checkpoint tree, step or model component")
        return store.parent(), comp, parse_step_name(store.parent().name), notes
    comp = step.components.get(component)
    if comp is None:
        have = ", ".join(step.components) or "none"
        raise UsageError(f"{parent.url_of(step.name)} has no {component}/ component (it has: {have})")
    return parent, comp, (step.step if step.step >= 0 else None), notes


def _fix_config(config: dict[str, Any], dtype_written: str | None, summary: ExportSummary) -> dict[str, Any]:
    out = dict(config)
    archs = out.get("architectures") or []
    fixed = [a[len("FSDP"):] if isinstance(a, str) and a.startswith("FSDP") else a for a in archs]
    if fixed != archs:
        summary.warnings.append(f"removed the stray 'FSDP' prefix from architectures: {archs} -> {fixed}")
        out["architectures"] = fixed
    summary.architecture = list(out.get("architectures") or [])
    if dtype_written:
        out["torch_dtype"] = dtype_written  # transformers 4 reads this key
        out["dtype"] = dtype_written  # transformers 5 reads this one
    return out


def _read_hf_files(store: Store, comp: Component) -> tuple[dict[str, Any], dict[str, bytes]]:
    rel_dir = HF_DIR if comp.backend != HF else ""
    names = [f.path[len(rel_dir) + 1:] if rel_dir else f.path for f in comp.files
             if (f.path.startswith(rel_dir + "/") if rel_dir else "/" not in f.path)]
    if "config.json" not in names:
        raise CkptctlError(f"{store.url_of(comp.path)}: no {HF_DIR}/config.json, so the model architecture is "
                           "unknown; SkyRL writes it with every checkpoint")
    comp_store = store.child(comp.path)
    config = json.loads(comp_store.read_bytes(posixpath.join(rel_dir, "config.json")))
    extra = {n: comp_store.read_bytes(posixpath.join(rel_dir, n)) for n in names
             if n != "config.json" and "/" not in n and not n.endswith((".safetensors", ".bin", ".pt"))
             and n != "model.safetensors.index.json"}
    return config, extra


def _fsdp_outputs(reader, config: dict, summary: ExportSummary) -> tuple[list[tuple[str, TensorInfo]], Callable]:
    infos = [t for t in reader.tensors() if t.group == MODEL]
    names = {t.name for t in infos}
    tied = bool(config.get("tie_word_embeddings"))
    outputs = []
    for info in infos:
        name = _strip_wrappers(info.name)
        if name.endswith(_NON_PERSISTENT_SUFFIXES):
            summary.skipped[info.name] = "non-persistent buffer (transformers recomputes it)"
        elif tied and name == "lm_head.weight" and "model.embed_tokens.weight" in {_strip_wrappers(n) for n in names}:
            summary.skipped[info.name] = "tied to model.embed_tokens.weight (save_pretrained omits it)"
        else:
            outputs.append((name, info))
    by_name = dict(outputs)

    def stream() -> Iterator[tuple[str, Any]]:
        for name, info in outputs:
            yield name, reader.read_tensor(info.name)

    return [(n, by_name[n]) for n, _ in outputs], stream


def _megatron_outputs(reader, config: dict, summary: ExportSummary):
    from ckptctl.formats.mcore_to_hf import build_plan

    infos = reader.tensor_infos()
    plan = build_plan(config, infos)
    summary.skipped.update(plan.skipped)
    summary.warnings.extend(plan.warnings)
    dtype_of = {}
    for step in plan.steps:
        source_dtype = infos[step.sources[0].key].dtype
        for out in step.outputs:
            dtype_of[out.name] = source_dtype
    specs = [(o.name, TensorInfo(name=o.name, shape=tuple(o.shape), dtype=dtype_of[o.name])) for o in plan.outputs]

    def stream():
        return plan.iter_tensors(lambda src: reader.read_tensor(src.key, src.layer))

    return specs, stream


def export_hf(src: str, out: str, *, component: str = "policy", dtype: str = "auto",
              max_shard_size: str | int = "5GB", overwrite: bool = False, merge_lora: bool = False,
              verify: bool = True, endpoint_url: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Export ``component`` of the checkpoint at ``src`` to an HF model directory ``out``.

    ``progress(done, total)`` is called after each tensor.
    """
    from ckptctl.formats.hf_writer import HfModelWriter, verify_export

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if component not in MODEL_COMPONENTS:
        raise UsageError(f"--component must be policy or critic, not {component!r}")
    src_store = open_store(src, endpoint_url=endpoint_url)
    dst_store = open_store(out, endpoint_url=endpoint_url)
    if _is_inside(dst_store, src_store):
        raise UsageError(f"refusing to write {dst_store.url} inside the source {src_store.url}")
    if _is_inside(src_store, dst_store):
        raise UsageError(f"refusing to write {dst_store.url}: it contains the source {src_store.url}")

    parent, comp, step, notes = resolve_component(src_store, component)
    summary = ExportSummary(source=parent.url_of(comp.path), component=comp.name, backend=comp.backend,
                            destination=dst_store.url, step=step, dtype="source" if dtype == "auto" else dtype,
                            warnings=notes)
    if comp.backend == HF:
        raise UsageError(f"{summary.source} is already an HF export")
    if not comp.complete:
        raise CkptctlError(f"{summary.source} is incomplete: " + "; ".join(comp.problems))
    if comp.has_lora:
        if merge_lora:
            raise UsageError("--merge-lora is not supported yet: export the adapter as-is (without --merge-lora)")
        summary.warnings.append("lora_adapter/ copied as-is beside the base weights")
    config, extra_files = _read_hf_files(parent, comp)
    comp_store = parent.child(comp.path)
    if comp.has_lora:
        for f in comp.files:
            if f.path.startswith("lora_adapter/") and f.path.count("/") == 1:
                extra_files[f.name] = comp_store.read_bytes(f.path)

    kwargs = {"nesting": comp.nesting} if comp.backend == MEGATRON else {}
    with open_reader(comp_store, comp.backend, **kwargs) as reader:
        if comp.backend in (FSDP, FSDP_SINGLE):
            specs, stream = _fsdp_outputs(reader, config, summary)
        else:
            specs, stream = _megatron_outputs(reader, config, summary)
        if comp.name == "critic":
            summary.warnings.append("a critic's value_head is not a transformers head: load it with SkyRL's "
                                    "critic class (AutoModelForCausalLM would add a random lm_head)")
        target = DTYPES[dtype]
        out_specs = [(name, info.shape, target or info.dtype) for name, info in specs]
        written_dtypes = sorted({d for _, _, d in out_specs})
        with HfModelWriter(dst_store.url, out_specs, max_shard_size=max_shard_size, overwrite=overwrite,
                           store=dst_store) as writer:
            import torch

            total = len(out_specs)
            for done, (name, tensor) in enumerate(stream(), start=1):
                if target is not None and str(tensor.dtype) != f"torch.{target}":
                    tensor = tensor.to(getattr(torch, target))
                writer.add(name, tensor.contiguous())
                del tensor
                if progress:
                    progress(done, total)
            fixed = _fix_config(config, written_dtypes[0] if len(written_dtypes) == 1 else None, summary)
            result = writer.finish(fixed, extra_files)
    summary.tensors = result.tensor_count
    summary.shards = result.shard_count
    summary.bytes = result.total_size
    summary.files = list(result.files)
    summary.dtypes_written = dict(result.dtype_counts)
    if verify:
        problems = verify_export(dst_store.url, {n: (tuple(s), d) for n, s, d in out_specs},
                                 endpoint_url=endpoint_url)
        if problems:
            raise CkptctlError(f"verification of {dst_store.url} failed: " + "; ".join(problems[:5]))
        summary.verified = True
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
