"""``export-hf``: stream one FSDP or Megatron component into a verified HuggingFace model.

Tensor by tensor: read one global tensor (assembled from its rank pieces or DCP chunks by the
format reader; Megatron's stacked layers one layer at a time), cast if asked, hand it to the
streaming safetensors writer, drop it. A reading thread prepares the next tensor while this
one is written (at most two alive), so peak memory stays near the largest tensor (two in the
worst case) plus the writer's buffer, whatever the model size. The writer's commit protocol (temp sibling + rename
locally; weights first, ``config.json`` last on object stores) means a run killed at any
moment leaves nothing that looks like a complete model, and a rerun succeeds; the output is
re-read and checked before that commit.

When nothing needs converting -- an FSDP2 checkpoint of plain and ``Shard(0)`` tensors exported
in its own dtype, without LoRA or a transformers-5 expert split -- the tensors are copied as
bytes (:mod:`ckptctl.formats.fsdp_bytes`: a global tensor is its ranks' pieces one after the
other) and torch is never imported: its import was most of an export's start on an object store.
Anything else is read and converted with torch as before; the output is the same either way.

On object stores the transfers hide behind the conversion (:class:`Transfer`, ``--concurrency``
and ``--max-memory``): the ranged reads of the next tensors' pieces (FSDP) or chunks (Megatron,
in the order the conversion steps read them) are planned from the metadata and fetched ahead
by several threads, neighbours coalesced and large ranges split, within a byte budget
(:class:`ckptctl.ops.transfer.ReadAheadScope`; the bytes are CRC-checked when used, as
before), and output shards upload in the background, S3 parts several at a time, while the
next tensors are produced (:class:`ckptctl.formats.hf_writer.HfModelWriter`).

A LoRA model (FSDP files holding a PEFT state dict, see :mod:`ckptctl.formats.peft`) exports
its base weights under HF names plus ``lora_adapter/`` as saved, or with ``merge_lora`` one
standalone model: each adapted weight is read with its two small factors and merged on the fly.

Several processes (torchrun, ``export-hf --workers``; :func:`export_hf` ``distributed``) share
the output shards, through the machinery ``convert-reshard`` uses
(:mod:`ckptctl.ops.distributed`): every process plans the same shards, writes its own run of them
(reading only their source tensors) into the output process 0 opened, and process 0 commits once
all reported (:class:`_Share`, :func:`_shared`).
"""

from __future__ import annotations

import math
import posixpath
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from ckptctl.errors import CkptctlError, NotACheckpointError, UsageError
from ckptctl.formats import open_reader
from ckptctl.formats.base import MODEL, TensorInfo
from ckptctl.formats.hf_saved_layout import converts_on_save, saved_layout
from ckptctl.formats.manifest import ManifestCheck
from ckptctl.formats.peft import (ADAPTER_CONFIG, LoraPair, delta_shape, is_peft_state, merge_lora_weight,
                                  parse_adapter_config, split_peft_state)
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.output_dir import refuse_overlap
from ckptctl.ops.transfer import ReadAheadScope, Transfer, one_intra_op_thread
from ckptctl.storage import FileEntry, Store, open_store
from ckptctl.tree import (FSDP, FSDP_SINGLE, HF, MEGATRON, MODEL_COMPONENTS, POINTER_FILE, STEP_FILES, UNKNOWN,
                          Component, Step, Tree, classify_component, classify_step, parse_step_name, scan_tree)

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
HF_DIR = "huggingface"
LORA_DIR = "lora_adapter"
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
    lora: dict | None = None  # a LoRA model: merged or not, adapted modules, scaling settings
    verified: bool = False
    manifest_checked: bool = False  # the source's files matched its ckptctl-manifest.json
    replaced: str | None = None  # what --overwrite replaced at the destination, in words
    processes: int = 1  # processes that shared the work (torchrun, --workers)
    byte_copy: bool = False  # nothing needed converting: tensors copied as bytes, torch never imported
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _strip_wrappers(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


TREE, STEP, COMPONENT = "tree", "step", "component"


def locate(store: Store) -> tuple[str, Tree | Step | Component, list[FileEntry]]:
    """What ``store`` holds, from one listing: (TREE, Tree, files) for a checkpoint tree (step
    directories or the pointer file at its top; scanned with :func:`scan_tree` from the same
    listing), (STEP, Step, files) for a step directory (a model component or a step file at its
    top), else (COMPONENT, Component, files); the step and component are classified against the
    parent."""
    files = store.walk()
    tops = {f.path.split("/", 1)[0] for f in files if "/" in f.path}
    top_files = {f.path for f in files if "/" not in f.path}
    if any(parse_step_name(t) is not None for t in tops) or POINTER_FILE in top_files:
        return TREE, scan_tree(store, files), files
    if tops & set(MODEL_COMPONENTS) or top_files & set(STEP_FILES):
        number = parse_step_name(store.name)
        return STEP, classify_step(store.parent(), store.name, number if number is not None else -1, files), files
    return COMPONENT, component_at(store, files), files


def component_at(store: Store, files: list[FileEntry]) -> Component:
    """The component directory ``store`` (``files``: its listing), classified against its parent."""
    return classify_component(store.parent(), store.name, store.name, files)


def chosen_step(tree: Tree) -> Step | None:
    """The step a command given a whole tree works on: the pointer target when it is complete,
    else the newest complete step of the current run (:class:`ckptctl.tree.CurrentRun`: never an
    older run's higher step above the pointer)."""
    target = tree.pointer_target
    return target if target is not None and target.complete else tree.current_run.newest_complete


def check_component_choice(store: Store, comp: Component, component: str | None) -> None:
    """A component directory given as SRC with ``--component`` naming another one: a usage error
    (the option would otherwise be silently ignored)."""
    if component and store.name in MODEL_COMPONENTS and store.name != component:
        raise UsageError(f"{store.url} is the {store.name}/ component, but --component {component} was given "
                         f"(pass the step directory to choose, or drop --component)")


def resolve_component(store: Store, component: str | None) -> tuple[Store, Component, int | None, list[str]]:
    """Find the model component to export in a tree, a step directory or a component directory.

    ``component``: policy or critic (None: policy in a step or tree, whichever SRC is when it is
    a component directory; naming another one than SRC is is a usage error).
    Returns (store rooted at the component's parent, component, step, notes)."""
    kind, found, _ = locate(store)
    notes: list[str] = []
    if kind == COMPONENT:
        if found.backend == UNKNOWN:
            raise NotACheckpointError(f"{store.url}: not a checkpoint tree, step or model component")
        check_component_choice(store, found, component)
        return store.parent(), found, parse_step_name(store.parent().name), notes
    component = component or "policy"
    if kind == TREE:
        tree = found
        step = chosen_step(tree)
        if step is None:
            raise NotACheckpointError(f"{store.url}: no complete step to export")
        why = "pointer target" if step is tree.pointer_target else "newest complete step of the current run"
        notes.append(f"exporting {step.name}, the {why}")
        parent = store
    else:
        step, parent = found, store.parent()
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
    if dtype_written and dtype_written != str(out.get("dtype") or out.get("torch_dtype") or dtype_written):
        summary.warnings.append(f"config.json dtype {out.get('dtype') or out.get('torch_dtype')} -> {dtype_written} "
                                "(what was written)")
    if dtype_written:
        out["torch_dtype"] = dtype_written  # transformers 4 reads this key
        out["dtype"] = dtype_written  # transformers 5 reads this one
    return out


_FLOATING = ("float64", "float32", "float16", "bfloat16")


def _is_floating(dtype: Any) -> bool:
    name = str(dtype).removeprefix("torch.")
    return name in _FLOATING or name.startswith("float8")


def _config_dtype(out_specs: list[tuple[str, Any, Any]]) -> str | None:
    """The dtype config.json should name: that of the floating-point tensors written (the one
    holding the most elements if they differ); None without any floating-point tensor."""
    counts: dict[str, int] = {}
    for _, shape, dtype in out_specs:
        name = str(dtype).removeprefix("torch.")
        if _is_floating(name):
            counts[name] = counts.get(name, 0) + math.prod(int(d) for d in shape)
    return max(counts, key=counts.get) if counts else None


def _hf_dir_names(comp: Component) -> tuple[str, list[str]]:
    """Where a component's HF files lie (``huggingface/``; an export's top) and their names there."""
    rel_dir = HF_DIR if comp.backend != HF else ""
    return rel_dir, [f.path[len(rel_dir) + 1:] if rel_dir else f.path for f in comp.files
                     if (f.path.startswith(rel_dir + "/") if rel_dir else "/" not in f.path)]


def read_model_config(store: Store, comp: Component) -> dict[str, Any]:
    """The HF ``config.json`` of ``comp`` (``store``: rooted at its parent); a one-line error without it."""
    rel_dir, names = _hf_dir_names(comp)
    if "config.json" not in names:
        raise CkptctlError(f"{store.url_of(comp.path)}: no {HF_DIR}/config.json, so the model architecture is "
                           "unknown; SkyRL writes it with every checkpoint")
    return store.child(comp.path).read_json(posixpath.join(rel_dir, "config.json"))


def open_component_reader(store: Store, comp: Component):
    """The format reader of ``comp`` (``store``: rooted at its parent)."""
    kwargs = {"nesting": comp.nesting} if comp.backend == MEGATRON else {}
    return open_reader(store.child(comp.path, comp.files), comp.backend, **kwargs)


def _read_hf_files(store: Store, comp: Component) -> tuple[dict[str, Any], dict[str, bytes]]:
    config = read_model_config(store, comp)
    rel_dir, names = _hf_dir_names(comp)
    comp_store = store.child(comp.path)
    extra = {n: comp_store.read_bytes(posixpath.join(rel_dir, n)) for n in names
             if n != "config.json" and "/" not in n and not n.endswith((".safetensors", ".bin", ".pt"))
             and n != "model.safetensors.index.json"}
    return config, extra


@dataclass
class HfTensors:
    """A component's model tensors under HF names and in HF layout, as an export writes them.

    ``specs``: (HF name, metadata) in export order; ``stream()``: (HF name, tensor) in that order;
    ``read(name)``: one tensor by HF name (Megatron: its conversion step is run and its outputs
    kept until another step is needed, so reading in ``specs`` order reads each source once).
    ``lora``: the LoRA side of a PEFT model, else None."""

    specs: list[tuple[str, TensorInfo]]
    stream: Callable[[], Iterator[tuple[str, Any]]]
    read: Callable[[str], Any]
    lora: "_LoraSource | None" = None
    #: HF name -> the group of tensors save_pretrained keeps in one shard (one MoE projection's experts)
    shard_groups: dict[str, str] = field(default_factory=dict)
    #: Completes the CRC checks of partly read chunks (call before trusting what was read)
    finish: Callable[[], None] | None = None
    #: HF names -> what reading them (in that order) reads from the reader, in order, as the
    #: reader's ``planned_reads`` takes it (FSDP: tensor names; Megatron: tensors, layers of
    #: stacked tensors and regions): the plan of a read-ahead; None: not known
    sources: Callable[[list[str]], list[Any]] | None = None
    #: the reader the tensors come from, when not the component's FsdpReader (a byte copy's)
    reader: Any = None


def hf_tensors(reader, comp: Component, comp_store: Store, config: dict, summary: ExportSummary, *,
               merge_lora: bool = False) -> HfTensors:
    """The model tensors of ``comp`` (opened as ``reader``) under HF names, whatever its backend:
    FSDP names unwrapped (a PEFT model's base weights, or with ``merge_lora`` the merged ones),
    Megatron through the mcore -> HF name mapping (``config``: its HF config), an HF export as
    stored. Tensors an export leaves out are named in ``summary.skipped``."""
    if comp.backend in (FSDP, FSDP_SINGLE):
        infos = {_strip_wrappers(t.name): t for t in reader.tensors() if t.group == MODEL}
        peft = is_peft_state(infos)
        if merge_lora and not peft:
            raise UsageError(f"--merge-lora: {summary.source} is not a LoRA (PEFT) model, nothing to merge"
                             + (f" ({LORA_DIR}/ is there, but the model files hold no LoRA weights)"
                                if comp.has_lora else ""))
        lora = _LoraSource(reader, comp_store, comp, merge_lora) if peft else None
        found = _fsdp_outputs(reader, infos, config, summary, lora)
        found.lora = lora
        return found
    if comp.backend == MEGATRON:
        return _megatron_outputs(reader, config, summary)
    specs = [(t.name, t) for t in reader.tensors()]

    def stream() -> Iterator[tuple[str, Any]]:
        for name, _ in specs:
            yield name, reader.read_tensor(name)

    return HfTensors(specs, stream, reader.read_tensor)


def _byte_copy_tensors(reader, comp: Component, config: dict, summary: ExportSummary, *, dtype: str,
                       merge_lora: bool) -> HfTensors | None:
    """An FSDP2 component's HF tensors as bytes, read without torch
    (:mod:`ckptctl.formats.fsdp_bytes`), when exporting it converts nothing: no cast, no LoRA,
    no transformers-5 expert split; else None (the tensors are read with torch). Same names,
    order, shards and bytes as :func:`hf_tensors` gives."""
    from ckptctl.formats.fsdp_bytes import byte_copy_reader

    if comp.backend != FSDP or merge_lora or converts_on_save(config):
        return None
    raw = byte_copy_reader(reader)
    if raw is None:
        return None
    infos = {_strip_wrappers(t.name): t for t in raw.tensors()}
    target = DTYPES[dtype]
    if is_peft_state(infos) or (target and any(_is_floating(i.dtype) and i.dtype != target for i in infos.values())):
        return None
    found = _fsdp_outputs(raw, infos, config, summary, None)
    found.reader = raw
    return found


def _fsdp_outputs(reader, infos: dict[str, TensorInfo], config: dict, summary: ExportSummary,
                  lora: "_LoraSource | None") -> HfTensors:
    """The HF tensors of an FSDP component (``infos``: its model tensors by unwrapped name).
    A LoRA (PEFT) model exports its base weights, or with ``lora.merge`` the merged ones."""
    if lora is not None:
        entries = lora.entries(infos, summary)
    else:
        entries = [(name, info, info.name) for name, info in infos.items()]
    hf_names = {name for name, _, _ in entries}
    tied = bool(config.get("tie_word_embeddings"))
    outputs = []
    for name, info, source in entries:
        if name.endswith(_NON_PERSISTENT_SUFFIXES):
            summary.skipped[info.name] = "non-persistent buffer (transformers recomputes it)"
        elif tied and name == "lm_head.weight" and "model.embed_tokens.weight" in hf_names:
            summary.skipped[info.name] = "tied to model.embed_tokens.weight (save_pretrained omits it)"
        else:
            outputs.append((name, info, source))

    sources = {name: source for name, _, source in outputs}

    def read_source(name: str) -> Any:
        source = sources[name]
        return source() if callable(source) else reader.read_tensor(source)

    def source_names(names: list[str], hf_source: Callable[[str], str] = lambda name: name) -> list[str]:
        found = []
        for name in names:
            source = sources[hf_source(name)]
            found.extend(source.reads if callable(source) else (source,))
        return list(dict.fromkeys(found))

    if not converts_on_save(config):
        def stream() -> Iterator[tuple[str, Any]]:
            for name in sources:
                yield name, read_source(name)

        specs = [(name, TensorInfo(name=name, shape=info.shape, dtype=info.dtype)) for name, info, _ in outputs]
        return HfTensors(specs, stream, read_source, sources=source_names)

    # transformers 5 MoE classes: experts fused in memory, one tensor per expert on save
    dtypes = {name: info.dtype for name, info, _ in outputs}
    layout = {t.name: t for t in saved_layout(config, [(name, info.shape) for name, info, _ in outputs])}
    fused: dict[str, Any] = {}  # the one fused expert tensor being split, no more

    def read(name: str) -> Any:
        t = layout[name]
        if t.expert is None:
            return read_source(t.source)
        if t.source not in fused:
            fused.clear()
            fused[t.source] = read_source(t.source)
        block = fused[t.source][t.expert]
        return (block if t.rows is None else block[t.rows[0]:t.rows[1]]).clone()

    def stream() -> Iterator[tuple[str, Any]]:
        try:
            for name in layout:
                yield name, read(name)
        finally:
            fused.clear()

    specs = [(t.name, TensorInfo(name=t.name, shape=t.shape, dtype=dtypes[t.source])) for t in layout.values()]
    return HfTensors(specs, stream, read, shard_groups={t.name: t.shard_group for t in layout.values() if t.shard_group},
                     sources=lambda names: source_names(names, lambda name: layout[name].source))


class _LoraSource:
    """The LoRA side of an FSDP component whose model files hold a PEFT state dict."""

    def __init__(self, reader, comp_store: Store, comp: Component, merge: bool):
        self.reader = reader
        self.merge = merge
        self.where = comp_store.url_of(LORA_DIR)
        self.config_path = posixpath.join(LORA_DIR, ADAPTER_CONFIG)
        self.config_bytes = (comp_store.read_bytes(self.config_path)
                             if any(f.path == self.config_path for f in comp.files) else None)

    def entries(self, infos: dict[str, TensorInfo], summary: ExportSummary) -> list[tuple[str, TensorInfo, Any]]:
        state = split_peft_state(infos)
        source = summary.source
        if len(state.adapters) > 1:
            raise UsageError(f"{source} holds {len(state.adapters)} LoRA adapters ({', '.join(sorted(state.adapters))});"
                             " only a single-adapter model can be exported")
        if self.config_bytes is None:
            raise CkptctlError(f"{source} is a LoRA (PEFT) model but {self.config_path} is missing (SkyRL does not "
                               "stop when saving the adapter fails): without its scaling the adapter can be neither "
                               "copied nor merged")
        modules = len(state.pairs) + len({p.module for p in state.saved.values()})
        summary.lora = {"merged": self.merge, "adapted_modules": modules, "adapter": sorted(state.adapters)}
        if not self.merge:
            summary.warnings.append(f"LoRA model: the base weights are exported and the adapter ({modules} modules) "
                                    f"copied as-is into {LORA_DIR}/; pass --merge-lora for one merged model")
            return [(name, infos[p.source], p.source) for name, p in state.base.items()]

        cfg = parse_adapter_config(self.config_bytes, f"{self.where}/{ADAPTER_CONFIG}")
        alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
        summary.lora.update(r=cfg.r, lora_alpha=alpha, use_rslora=cfg.use_rslora)
        if state.unsupported:
            first = state.unsupported[0]
            raise UsageError(f"{first.source}: this kind of adapter tensor (DoRA magnitude, LoRA bias, another PEFT "
                             "method) cannot be merged yet; export without --merge-lora")
        merges: dict[str, tuple[LoraPair, float, bool]] = {}
        for module, pair in state.pairs.items():
            if pair.a is None or pair.b is None:
                raise CorruptCheckpointError(f"{source}: {module} has only one of its two LoRA factors")
            target = f"{module}.weight"
            base = state.base.get(target)
            if base is None:
                raise CorruptCheckpointError(f"{source}: LoRA factors for {module} but no base weight {target}")
            a_shape, b_shape = infos[pair.a.source].shape, infos[pair.b.source].shape
            transpose = pair.embedding or cfg.fan_in_fan_out
            shape = delta_shape(pair, a_shape, b_shape, cfg.fan_in_fan_out)
            if tuple(shape) != tuple(infos[base.source].shape):
                raise CorruptCheckpointError(f"{source}: the LoRA update of {module} has shape {list(shape)}, its "
                                             f"weight {list(infos[base.source].shape)}")
            merges[target] = (pair, cfg.scaling(module, a_shape[0]), transpose)
        for name, saved in state.saved.items():
            base = state.base.get(name)
            if base is not None and tuple(infos[base.source].shape) != tuple(infos[saved.source].shape):
                raise CorruptCheckpointError(f"{source}: modules_to_save copy {saved.source} does not match {name}")

        entries: list[tuple[str, TensorInfo, Any]] = []
        names = list(state.base) + [n for n in state.saved if n not in state.base]
        for name in names:
            if name in state.saved:  # the adapter's trained copy replaces the original module
                saved = state.saved[name]
                entries.append((name, infos[saved.source], saved.source))
            elif name in merges:
                entries.append((name, infos[state.base[name].source], self._merged(state.base[name].source,
                                                                                   *merges[name])))
            else:
                entries.append((name, infos[state.base[name].source], state.base[name].source))
        return entries

    def _merged(self, base_name: str, pair: LoraPair, scaling: float, transpose: bool) -> Callable[[], Any]:
        def produce():
            weight = self.reader.read_tensor(base_name)
            a = self.reader.read_tensor(pair.a.source)
            b = self.reader.read_tensor(pair.b.source)
            return merge_lora_weight(weight, a, b, scaling, transpose=transpose)
        produce.reads = (base_name, pair.a.source, pair.b.source)  # what a read-ahead fetches for it
        return produce


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
    groups = {o.name: o.shard_group for o in plan.outputs if o.shard_group}

    def request(src) -> tuple:
        """What reading ``src`` asks the reader (as its ``planned_reads`` takes it): (key, layer)
        for :meth:`read_tensor`, (key, offsets, sizes) for :meth:`read_region`."""
        if src.expert is None and src.rows is None:
            return src.key, src.layer
        # one expert (of one layer), or its gate or up rows: only the chunks that hold it are read
        return (src.key, *src.region(infos[src.key].shape))

    def read_source(src):
        asked = request(src)
        if len(asked) == 2:
            return reader.read_tensor(*asked)
        return reader.read_region(*asked).reshape(src.shape)

    def stream():
        return plan.iter_tensors(read_source)

    step_of = {out.name: step for step in plan.steps for out in step.outputs}

    def sources(names: list[str]) -> list[tuple]:
        """The reads :meth:`ConversionPlan.reader` makes for ``names`` in that order (a step's
        sources when one of its outputs is first asked; its other outputs are kept)."""
        kept: set[str] = set()
        reads = []
        for name in names:
            if name in kept:
                kept.discard(name)
                continue
            step = step_of[name]
            reads.extend(request(src) for src in step.sources)
            kept.update(o.name for o in step.outputs if o.name != name)
        return reads

    return HfTensors(specs, stream, plan.reader(read_source), shard_groups=groups,
                     finish=getattr(reader, "finish_crc_checks", None), sources=sources)


#: Tensors alive at once while exporting: the one being written plus the one being read.
PREFETCH_SLOTS = 2
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetched(items: Iterator[Any], slots: int = PREFETCH_SLOTS) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, one item ahead of the caller.

    At most ``slots`` items exist at a time: the one the caller holds (released when it asks
    for the next) and the ones read ahead. The producer thread alone advances ``items`` (so a
    reader is never used from two threads); its exceptions are re-raised here, in order. When
    the caller stops early (an error, a break), the producer is told to stop and joined before
    this generator returns, so the reader is not closed under it. ``slots <= 1``: no thread.
    """
    if slots <= 1:
        yield from items
        return
    import queue
    import threading

    free = threading.Semaphore(slots)
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                free.acquire()
                if stop.is_set():
                    return
                item = next(items, _DONE)
                ready.put(item)
                if item is _DONE:
                    return
                del item
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(_Failed(exc))

    thread = threading.Thread(target=produce, name="ckptctl-export-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
            del item
            free.release()  # the caller is done with the previous item
    finally:
        stop.set()
        free.release()  # wake the producer if it waits for a slot
        thread.join()


def export_hf(src: str, out: str, *, component: str | None = None, dtype: str = "auto",
              max_shard_size: str | int = "5GB", overwrite: bool = False, merge_lora: bool = False,
              verify: bool = True, endpoint_url: str | None = None,
              progress: Callable[[int, int], None] | None = None, concurrency: int | None = None,
              max_memory: int | str | None = None, distributed: bool | None = None) -> ExportSummary:
    """Export ``component`` of the checkpoint at ``src`` to an HF model directory ``out``.

    ``progress(done, total)`` is called after each tensor. ``verify`` re-reads the output before
    committing it and, where the source has a ``ckptctl-manifest.json``, checks the source's hashes.
    ``concurrency`` / ``max_memory``: see :class:`Transfer` (defaults: 8 requests, 1 GiB or 1/8
    of RAM), per process.

    ``distributed``: None detects torchrun (``WORLD_SIZE`` > 1, or an initialised process group).
    Then the processes share the output shards (:func:`ckptctl.formats.hf_writer.assign_shards`:
    runs of shards balanced by bytes), each reading only the source bytes its tensors need and
    writing its own shards; process 0 opens the output first (a local destination's staging
    directory is shared: on several nodes, a filesystem they all mount), commits it (index and
    ``config.json`` last) only once every process has reported success, and returns the summary
    on every process; ``progress`` is called on process 0 only. A process that fails fails the
    run on every process (``process N: ...``) and nothing is committed. The output is the
    one-process export's, byte for byte.
    """
    kwargs = dict(component=component, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                  merge_lora=merge_lora, verify=verify, endpoint_url=endpoint_url, concurrency=concurrency,
                  max_memory=max_memory)
    if distributed is None:
        from ckptctl.ops.distributed import under_torchrun

        distributed = under_torchrun()
    if not distributed:
        return _export_process(src, out, progress=progress, share=None, **kwargs)
    return _shared(lambda share: _export_process(src, out, progress=progress if share.rank == 0 else None,
                                                 share=share, **kwargs))


def _export_process(src: str, out: str, *, component: str | None, dtype: str, max_shard_size: str | int,
                    overwrite: bool, merge_lora: bool, verify: bool, endpoint_url: str | None,
                    progress: Callable[[int, int], None] | None, concurrency: int | None,
                    max_memory: int | str | None, share: "_Share | None") -> ExportSummary:
    """The export, or this process's part of it (``share``)."""
    started = time.perf_counter()
    transfer = Transfer.make(concurrency, max_memory)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if component is not None and component not in MODEL_COMPONENTS:
        raise UsageError(f"--component must be policy or critic, not {component!r}")
    src_store = open_store(src, endpoint_url=endpoint_url)
    dst_store = open_store(out, endpoint_url=endpoint_url)
    refuse_overlap(src_store, dst_store)

    parent, comp, step, notes = resolve_component(src_store, component)
    summary = ExportSummary(source=parent.url_of(comp.path), component=comp.name, backend=comp.backend,
                            destination=dst_store.url, step=step, dtype="source" if dtype == "auto" else dtype,
                            warnings=notes)
    if comp.backend == HF:
        raise UsageError(f"{summary.source} is already an HF export")
    if not comp.complete:
        raise CkptctlError(f"{summary.source} is incomplete: " + "; ".join(comp.problems))
    if merge_lora and comp.backend == MEGATRON:
        raise UsageError("--merge-lora is supported for FSDP checkpoints (PEFT LoRA); not for Megatron ones")
    if share is None or share.rank == 0:
        from ckptctl.formats.hf_writer import judge_export_destination

        judge_export_destination(dst_store, overwrite)  # a refusal in a second, not after torch's import
    config, extra_files = _read_hf_files(parent, comp)
    comp_store = parent.child(comp.path)
    # With a manifest (verify --write-manifest), the source files are hashed while the export runs
    # (by process 0 alone when several share it).
    manifest = ManifestCheck.start(parent, comp) if verify and (share is None or share.rank == 0) else None
    try:
        summary.manifest_checked = manifest is not None
        return _export(parent, comp, comp_store, config, extra_files, summary, dst_store, dtype=dtype,
                       max_shard_size=max_shard_size, overwrite=overwrite, merge_lora=merge_lora,
                       verify=verify, manifest=manifest, progress=progress, started=started,
                       transfer=transfer, share=share)
    finally:
        if manifest is not None:
            manifest.cancel()


def _export(parent: Store, comp: Component, comp_store: Store, config: dict, extra_files: dict,
            summary: ExportSummary, dst_store: Store, *, dtype: str, max_shard_size: str | int, overwrite: bool,
            merge_lora: bool, verify: bool, manifest: "ManifestCheck | None",
            progress: Callable[[int, int], None] | None, started: float,
            transfer: Transfer | None = None, share: "_Share | None" = None) -> ExportSummary:
    from ckptctl.formats.hf_writer import HfModelWriter, TensorSpec, assign_shards, plan_shards

    transfer = transfer or Transfer.make()
    read_budget, upload_budget = transfer.budgets(not parent.is_local, not dst_store.is_local)
    with open_component_reader(parent, comp) as reader, ReadAheadScope() as read_ahead, ExitStack() as torch_scope:
        found = _byte_copy_tensors(reader, comp, config, summary, dtype=dtype, merge_lora=merge_lora)
        if found is not None:
            reader = found.reader  # its planned_reads: the same bytes
            summary.byte_copy = True
        else:
            torch_scope.enter_context(one_intra_op_thread())
            found = hf_tensors(reader, comp, comp_store, config, summary, merge_lora=merge_lora)
        specs, stream, lora = found.specs, found.stream, found.lora
        if comp.has_lora and not merge_lora:
            # In a subdirectory: an adapter_config.json at the top would make transformers load the
            # directory as a PEFT adapter, and a stray *.safetensors there is not a model shard.
            read = {lora.config_path: lora.config_bytes} if lora is not None and lora.config_bytes else {}
            for f in comp.files:
                if f.path.startswith(LORA_DIR + "/") and f.path.count("/") == 1:
                    extra_files[f.path] = read.get(f.path) or comp_store.read_bytes(f.path)
            if summary.lora is None:
                summary.warnings.append(f"{LORA_DIR}/ copied as-is into the export's {LORA_DIR}/")
        if comp.name == "critic":
            summary.warnings.append("a critic's value_head is not a transformers head: load it with SkyRL's "
                                    "critic class (AutoModelForCausalLM would add a random lm_head)")
        target = DTYPES[dtype]
        # --dtype casts floating-point tensors only (as model.to(dtype) does): an integer or
        # bool buffer keeps its dtype.
        out_specs = [(name, info.shape, target if target and _is_floating(info.dtype) else info.dtype)
                     for name, info in specs]
        config_dtype = _config_dtype(out_specs)
        writer_specs = [replace(TensorSpec.coerce(spec), shard_group=found.shard_groups.get(spec[0]))
                        for spec in out_specs]
        options = dict(max_shard_size=max_shard_size, store=dst_store, upload_concurrency=transfer.concurrency,
                       upload_memory=upload_budget or None)
        if share is None:
            writer = HfModelWriter(dst_store.url, writer_specs, overwrite=overwrite, **options)
        else:
            mine = assign_shards(plan_shards(writer_specs, max_shard_size), share.world)[share.rank]
            if share.rank == 0:
                writer = share.writer = HfModelWriter(dst_store.url, writer_specs, overwrite=overwrite,
                                                      shards=mine, **options)
            else:
                writer = HfModelWriter.attach(dst_store.url, writer_specs, staging=share.opened(), shards=mine,
                                              **options)
        with writer:
            if share is not None and share.rank == 0:
                share.open(writer.begin())  # the others write into what process 0 opened
            names = writer.tensor_names
            planner = getattr(reader, "planned_reads", None)  # HF sources: none, read as before
            if read_budget and transfer.concurrency > 1 and planner is not None:
                # what the reader reads for this process's tensors, in order (else: the model tensors
                # not skipped, in the reader's order)
                reads = (found.sources(names) if found.sources is not None else
                         [t.name for t in reader.tensors() if t.group == MODEL and t.name not in summary.skipped])
                read_ahead.start(reader.store, planner(reads), read_budget, transfer.concurrency)
            if share is None:
                stream = found.stream
            else:  # this process's shards only: each tensor read on its own (Megatron: by conversion step)
                def stream() -> Iterator[tuple[str, Any]]:
                    for name in names:
                        yield name, found.read(name)

            def prepared() -> Iterator[tuple[str, Any]]:
                if summary.byte_copy:  # bytes in the planned dtype already
                    yield from stream()
                    return
                import torch

                cast_to = getattr(torch, target) if target else None
                for name, tensor in stream():
                    if cast_to is not None and tensor.is_floating_point() and tensor.dtype != cast_to:
                        tensor = tensor.to(cast_to)
                    yield name, tensor.contiguous()
                    del tensor

            total = len(names)
            # Reading (and casting) the next tensor overlaps writing this one: two threads, at
            # most PREFETCH_SLOTS tensors alive at once.
            tensors = _prefetched(prepared(), PREFETCH_SLOTS)
            try:
                for done, (name, tensor) in enumerate(tensors, start=1):
                    writer.add(name, tensor)
                    del tensor
                    if progress:
                        progress(done, total)
            finally:
                tensors.close()  # stops and joins the reading thread before the reader closes
            fixed = _fix_config(config, config_dtype, summary)
            if found.finish is not None:
                found.finish()  # CRC checks of chunks read in part (one expert of several): before the commit
            if manifest is not None:
                manifest.result()  # the source's hashes: a mismatch aborts before the commit
            bytes_elsewhere = 0
            if share is not None and share.rank != 0:
                share.report(writer.finish_part())  # process 0 commits
                return summary
            if share is not None:
                bytes_elsewhere = share.collect()  # every other process's shards, or its error
            # Verified before the commit: a failed check leaves nothing behind.
            result = writer.finish(fixed, extra_files, verify=verify, bytes_elsewhere=bytes_elsewhere)
    summary.tensors = result.tensor_count
    summary.shards = result.shard_count
    summary.bytes = result.total_size
    summary.files = list(result.files)
    summary.dtypes_written = dict(result.dtype_counts)
    summary.verified = verify
    summary.replaced = result.replaced
    summary.processes = 1 if share is None else share.world
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


# ---------------------------------------------------------------------------------------------
# several processes (torchrun, --workers)
# ---------------------------------------------------------------------------------------------
class _Share:
    """This process's place in an export shared by several, and the run's three collectives
    (:class:`ckptctl.ops.distributed.ProcessGroup`, the machinery convert-reshard uses):
    process 0 says how opening the output went (:meth:`open` / :meth:`opened`), every other
    process reports its shards or its error (:meth:`report` / :meth:`collect`), process 0 says
    how the commit went (:func:`_shared`). ``step`` counts the collectives done, so that a
    process that fails early still takes part in the ones the others wait in."""

    def __init__(self, pg):
        self.pg = pg
        self.rank, self.world = pg.rank, pg.world
        self.step = 0
        self.ended = False  # process 0 failed to open: no collective follows
        self.writer = None  # process 0's writer (the owner of the output)

    def open(self, staging: str | None) -> None:
        self.pg.broadcast(("ok", staging))
        self.step = 1

    def opened(self) -> str | None:
        """Process 0's staging directory (None: an object store), once it opened the output."""
        from ckptctl.ops.distributed import raise_payload

        status = self.pg.broadcast()
        self.step = 1
        if status[0] == "error":
            self.ended = True
            raise_payload(status[1])
        return status[1]

    def report(self, part: tuple[list[str], int] | None, error: tuple | None = None) -> None:
        self.pg.gather(("ok", part) if error is None else ("error", error))
        self.step = 2

    def collect(self) -> int:
        """Process 0: the others' reports; their files are made known to the writer (kept by the
        commit, removed by an abort); the first error raised as ``process N: ...``. Returns the
        bytes the others wrote."""
        from ckptctl.ops.distributed import raise_payload

        gathered = self.pg.gather(("ok", ([], 0)))
        self.step = 2
        files = [f for g in gathered if g[0] == "ok" for f in g[1][0]]
        if self.writer is not None:
            self.writer.others_reported(files)
        for rank, g in enumerate(gathered):
            if g[0] == "error":
                raise_payload(g[1], f"process {rank}: ")
        return sum(g[1][1] for g in gathered)


def _shared(run: Callable[["_Share"], ExportSummary]) -> ExportSummary:
    """Run this process's part of a shared export (``run(share)``) and the collectives it did not
    reach; every process returns process 0's summary or raises the run's error."""
    from ckptctl.ops.distributed import PeerLostError, error_payload, mark_committed, process_group, raise_payload

    with process_group() as pg:
        share = _Share(pg)
        failure: BaseException | None = None
        try:
            outcome: tuple = ("ok", run(share))
        except PeerLostError:
            raise  # the group is gone: no collective can follow
        except BaseException as exc:  # noqa: BLE001 - handed to the other processes
            failure = exc
            outcome = ("error", error_payload(exc))
            if share.ended:
                raise
            if share.step == 0 and share.rank == 0:
                pg.broadcast(("error", outcome[1]))  # the others stop before writing anything
                raise
            if share.step == 0:
                try:
                    share.opened()
                except BaseException:
                    raise exc from None  # process 0 failed too: same error, nothing written
            if share.step == 1 and share.rank != 0:
                share.report(None, outcome[1])
            elif share.step == 1:  # process 0 failed while writing: wait for the others, then clean up
                try:
                    share.collect()
                except BaseException:  # noqa: BLE001 - process 0's own error is the run's
                    pass
                if share.writer is not None:
                    share.writer.abort()  # again, now that the others stopped: their files and the marker
        if pg.rank == 0 and outcome[0] == "ok":
            mark_committed()
            try:
                pg.broadcast(outcome)
            except PeerLostError:
                pass  # committed, and the others' shares were done: a process lost now changes nothing
            return outcome[1]
        final = pg.broadcast(outcome if pg.rank == 0 else None)
        if final[0] == "error":
            if failure is not None and pg.rank == 0:
                raise failure  # process 0's own error, as it was raised (its exit code too)
            raise_payload(final[1])
        return final[1]
