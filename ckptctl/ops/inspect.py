"""``inspect``: what a tree, a step, a component or a single file holds, metadata first.

Reads tensor METADATA only (the format readers never load tensor data for this), plus the
small state files: ``trainer_state.pt``, ``data.pt``, ``huggingface/config.json``. Every
pickle goes through :mod:`ckptctl.formats.safe_load`.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import CorruptFileError, NotACheckpointError, NotFoundError, UsageError
from ckptctl.formats import open_reader
from ckptctl.formats.base import MODEL, TensorInfo
from ckptctl.formats.integrity import deep_check_component, deep_check_step
from ckptctl.formats.moe import moe_summary
from ckptctl.ops.export import HF_DIR, LORA_DIR, STEP, TREE, check_component_choice, chosen_step, locate
from ckptctl.storage import Store, open_store
from ckptctl.tree import HF, MEGATRON, UNKNOWN, Component, Step

CONFIG_FIELDS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                 "tie_word_embeddings", "torch_dtype", "dtype")
TRAINER_CONFIG_FIELDS = ("trainer.strategy", "trainer.epochs", "trainer.train_batch_size", "trainer.ckpt_interval",
                         "trainer.max_ckpts_to_keep", "trainer.resume_mode", "trainer.ckpt_path",
                         "trainer.export_path", "trainer.policy.model.path", "trainer.seed")


@dataclass
class ComponentReport:
    name: str
    path: str
    backend: str
    complete: bool
    problems: list[str]
    world_size: int | None
    format: dict[str, Any] = field(default_factory=dict)  # the reader's summary()
    model_config: dict[str, Any] | None = None
    parameters: int = 0
    parameter_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    tensor_count: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] | None = None
    lora: dict[str, Any] | None = None  # a LoRA (PEFT) model: its adapter, see lora_summary
    moe: dict[str, Any] | None = None  # a mixture-of-experts model, see ckptctl.formats.moe
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        if self.tensors is not None:
            out["tensors"] = [t.to_dict() for t in self.tensors]
        return out


@dataclass
class InspectReport:
    url: str
    kind: str  # tree | step | component | file
    step: int | None = None
    tree: dict[str, Any] | None = None
    components: list[ComponentReport] = field(default_factory=list)
    trainer_state: dict[str, Any] | None = None
    data_loader: dict[str, Any] | None = None
    files: dict[str, Any] | None = None  # for a single file
    warnings: list[str] = field(default_factory=list)
    # the inspected step's (or component's) problems, deep checks included; None for a file
    complete: bool | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "url": self.url, "kind": self.kind, "step": self.step, "complete": self.complete,
            "problems": self.problems, "tree": self.tree,
            "components": [c.to_dict() for c in self.components],
            "trainer_state": self.trainer_state, "data_loader": self.data_loader, "file": self.files,
            "warnings": self.warnings,
        }


# -- pieces ---------------------------------------------------------------------------------

def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def read_full_config(store: Store, rel: str) -> dict[str, Any] | None:
    """An HF ``config.json``; None when absent."""
    try:
        config = store.read_json(rel)
    except NotFoundError:
        return None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{store.url_of(rel)}: corrupt file, not a JSON object")
    return config


def read_model_config(store: Store, rel: str) -> dict[str, Any] | None:
    """The architecture summary from an HF ``config.json``; None when absent."""
    config = read_full_config(store, rel)
    return None if config is None else {k: config[k] for k in CONFIG_FIELDS if k in config}


def _load_state_file(store: Store, rel: str, allow_globals: tuple[str, ...]) -> Any:
    from ckptctl.formats.safe_load import load_pt, to_plain

    local = store.local_path(rel)
    source = local if local else store.read_bytes(rel)
    return to_plain(load_pt(source, name=store.url_of(rel), extra_stand_ins=allow_globals))


def summarise_trainer_state(state: Any, dir_step: int | None, with_config: bool) -> dict[str, Any]:
    if not isinstance(state, dict):
        return {"type": type(state).__name__}
    config = state.get("config")
    out: dict[str, Any] = {"global_step": state.get("global_step"), "keys": sorted(map(str, state))}
    if dir_step is not None and state.get("global_step") is not None and state["global_step"] != dir_step:
        out["note"] = (f"saved global_step {state['global_step']} differs from the directory's step {dir_step} "
                       "(SkyRL uses the directory's)")
    if isinstance(config, dict):
        out["config_summary"] = {k: v for k in TRAINER_CONFIG_FIELDS if (v := _dig(config, k)) is not None}
        out["config_kind"] = config.get("__class__", "dict")
    if with_config:
        out["config"] = config
    return out


def summarise_data_state(state: Any) -> dict[str, Any]:
    """Position of a torchdata StatefulDataLoader from its state_dict()."""
    if not isinstance(state, dict):
        return {"type": type(state).__name__}
    out = {
        "batches_yielded": state.get("_num_yielded"),
        "samples_yielded": _dig(state, "_sampler_iter_state.samples_yielded"),
        "iterator_finished": state.get("_iterator_finished"),
        "keys": sorted(map(str, state)),
    }
    return {k: v for k, v in out.items() if v is not None}


def inspect_component(store: Store, comp: Component, *, with_tensors: bool = False,
                      allow_globals: tuple[str, ...] = ()) -> ComponentReport:
    """Reader summary and tensor statistics of one model component (store = its parent tree/step)."""
    report = ComponentReport(name=comp.name, path=comp.path, backend=comp.backend, complete=comp.complete,
                             problems=list(comp.problems), world_size=comp.world_size)
    comp_store = store.child(comp.path, comp.files) if comp.path else store
    full_config = read_full_config(comp_store, "config.json" if comp.backend == HF else f"{HF_DIR}/config.json")
    report.model_config = None if full_config is None else {k: full_config[k] for k in CONFIG_FIELDS
                                                             if k in full_config}
    archs = (report.model_config or {}).get("architectures") or []
    if any(str(a).startswith("FSDP") for a in archs):
        report.warnings.append(f"config.json architectures {archs} carry a stray 'FSDP' prefix that breaks "
                               "HF loaders (export-hf removes it)")
    if comp.backend == UNKNOWN:
        return report
    kwargs: dict[str, Any] = {}
    if allow_globals and comp.backend != HF:
        kwargs["extra_stand_ins"] = allow_globals
    if comp.backend == MEGATRON:
        kwargs["nesting"] = comp.nesting
    with open_reader(comp_store, comp.backend, **kwargs) as reader:
        tensors = list(reader.tensors())
        report.format = reader.summary()
        if comp.backend == MEGATRON:
            _bucket_parameters(reader, report.format)
    model = [t for t in tensors if t.group == MODEL]
    report.lora = lora_summary(comp_store, comp, model, report.warnings)
    report.moe = moe_summary(full_config, model)
    if report.moe is not None and comp.backend == MEGATRON:
        layout = (report.format.get("parallel") or {}).get("layout")
        if layout:
            report.moe["layout"] = layout
    report.parameters = sum(t.numel for t in model)
    report.parameter_bytes = sum(t.nbytes for t in model)
    report.dtypes = dict(Counter(t.dtype for t in model))
    report.tensor_count = dict(Counter(t.group for t in tensors))
    if with_tensors:
        report.tensors = tensors
    return report


def _bucket_parameters(reader, summary: dict) -> None:
    """The parameters each ``dp_reshardable`` bucket holds, where the bucket layout can be
    established (:func:`ckptctl.formats.distopt.annotate_buckets`); otherwise the optimizer summary
    says why in ``bucket_parameters`` -- inspect never fails for it."""
    from ckptctl.errors import CkptctlError
    from ckptctl.formats.distopt import annotate_buckets

    try:
        why = annotate_buckets(reader, summary)
    except (CkptctlError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    if why:
        summary["optimizer"]["bucket_parameters"] = f"not derived: {why}"


_ADAPTER_KEYS = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
                 "modules_to_save", "use_dora", "task_type", "base_model_name_or_path")


def lora_summary(comp_store: Store, comp: Component, model: list[TensorInfo], warnings: list[str]
                 ) -> dict[str, Any] | None:
    """What a LoRA (PEFT) component holds: adapted modules, adapter parameters, the adapter's
    settings from ``lora_adapter/adapter_config.json``. None for a plain model without an adapter."""
    from ckptctl.formats.peft import ADAPTER_CONFIG, is_peft_state, split_peft_state

    names = {t.name: t for t in model}
    peft_state = is_peft_state(names)
    if not peft_state and not comp.has_lora:
        return None
    out: dict[str, Any] = {"peft_state_dict": peft_state}
    if peft_state:
        state = split_peft_state(names)
        out["adapted_modules"] = len(state.pairs) + len({p.module for p in state.saved.values()})
        out["adapter_parameters"] = sum(names[n].numel for n in state.lora_names)
        out["adapters"] = sorted(state.adapters)
    rel = f"{LORA_DIR}/{ADAPTER_CONFIG}"
    if any(f.path == rel for f in comp.files):
        try:
            config = comp_store.read_json(rel)
            out["adapter_config"] = {k: config.get(k) for k in _ADAPTER_KEYS if k in config}
        except CorruptFileError as exc:
            warnings.append(str(exc))
    elif peft_state:
        warnings.append(f"a LoRA (PEFT) model without {rel}: export-hf cannot copy or merge its adapter")
    return out


def _inspect_step(store: Store, step: Step, report: InspectReport, *, with_tensors: bool, with_config: bool,
                  component: str | None, allow_globals: tuple[str, ...]) -> None:
    """Fill ``report`` from a step; ``store`` is rooted at the step's parent. The step is
    deep-checked first (file sizes against their own indexes): its problems lead the report."""
    report.step = step.step if step.step >= 0 else None
    deep_check_step(store, step)
    report.complete, report.problems = step.complete, list(step.problems)
    report.warnings += step.notes
    for comp in step.components.values():
        if component and comp.name != component:
            continue
        report.components.append(inspect_component(store, comp, with_tensors=with_tensors,
                                                   allow_globals=allow_globals))
    if component and not report.components:
        raise UsageError(f"{store.url_of(step.name)} has no {component}/ component")
    step_rel = step.name
    if step.has_file("trainer_state.pt"):
        state = _load_state_file(store, posixpath.join(step_rel, "trainer_state.pt"), allow_globals)
        report.trainer_state = summarise_trainer_state(state, report.step, with_config)
    if step.has_file("data.pt"):
        report.data_loader = summarise_data_state(
            _load_state_file(store, posixpath.join(step_rel, "data.pt"), allow_globals))
        if report.data_loader.get("iterator_finished"):
            report.warnings.append("the data loader was saved at the end of an epoch: SkyRL (and verl) skip the "
                                   "whole next epoch when resuming from such a checkpoint")


def _inspect_file(store: Store, report: InspectReport, allow_globals: tuple[str, ...]) -> None:
    name = store.name
    parent = store.parent()
    if name.endswith(".safetensors"):
        from ckptctl.formats.hf import read_safetensors_header

        report.files = {"format": "safetensors", **read_safetensors_header(parent, name)}
    elif name.endswith(".json"):
        report.files = {"format": "json", "content": parent.read_json(name)}
    elif name == ".metadata" or name.endswith(".distcp"):
        raise UsageError(f"{store.url}: part of a torch DCP / Megatron checkpoint; inspect its directory instead")
    else:
        head = parent.read_range(name, 0, 4)
        if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither a zip archive (torch.save) nor a pickle
            raise NotACheckpointError(f"{store.url}: not a checkpoint file (not a torch.save archive, pickle, "
                                      "safetensors or JSON file)")
        state = _load_state_file(parent, name, allow_globals)
        report.files = {"format": "torch.save", "content": describe_object(state)}


def describe_object(obj: Any, depth: int = 0) -> Any:
    """A JSON-able outline of a loaded object: tensors become shape/dtype strings."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        spec = getattr(obj, "_spec", None)
        kind = "DTensor" if spec is not None else "Tensor"
        extra = f" placements={tuple(str(p) for p in spec.placements)}" if spec is not None else ""
        return f"{kind}{list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}{extra}"
    if isinstance(obj, dict):
        if depth > 6:
            return f"dict({len(obj)} keys)"
        return {str(k): describe_object(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) > 16 and all(isinstance(v, (int, float)) for v in obj):
            return f"{type(obj).__name__}[{len(obj)} numbers]"
        return [describe_object(v, depth + 1) for v in obj[:64]]
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy arrays (RNG state)
        return f"ndarray{list(obj.shape)} {obj.dtype}"
    return obj


# -- entry point ----------------------------------------------------------------------------

def inspect_path(url: str, *, with_tensors: bool = False, with_config: bool = False, component: str | None = None,
                 allow_globals: tuple[str, ...] = (), endpoint_url: str | None = None) -> InspectReport:
    """Inspect a tree (its pointer target, or newest complete step), a step, a component, or one file."""
    store = open_store(url, endpoint_url=endpoint_url)
    report = InspectReport(url=store.url, kind="file")
    if store.is_file():
        _inspect_file(store, report, allow_globals)
        return report
    kind, found, _ = locate(store)
    kw = dict(with_tensors=with_tensors, with_config=with_config, component=component, allow_globals=allow_globals)
    if kind == TREE:
        tree = found
        step = chosen_step(tree) or tree.pointer_target
        report.kind = "tree"
        if step is None:
            raise NotACheckpointError(f"{store.url}: no step to inspect")
        _inspect_step(store, step, report, **kw)
        # after the step's deep check: a damaged step is no longer the newest complete one
        report.tree = {"kind": tree.kind, "steps": [s.step for s in tree.steps],
                       "pointer": tree.pointer.step, "newest_complete": tree.newest_complete.step
                       if tree.newest_complete else None, "warnings": tree.warnings()}
        report.warnings.insert(0, f"inspected {step.name} (the "
                               + ("pointer target" if step is tree.pointer_target else "newest complete step") + ")")
        return report
    if kind == STEP:
        report.kind = "step"
        _inspect_step(store.parent(), found, report, **kw)
        return report
    if found.backend == UNKNOWN:
        raise NotACheckpointError(f"{store.url}: not a checkpoint tree, step, component or checkpoint file")
    check_component_choice(store, found, component)
    report.kind = "component"
    deep_check_component(store.parent(), found)
    report.complete, report.problems = found.complete, list(found.problems)
    report.components.append(inspect_component(store.parent(), found, with_tensors=with_tensors,
                                                allow_globals=allow_globals))
    return report
