"""``convert-reshard`` for Megatron ``torch_dist`` checkpoints: rewrite a checkpoint for a new
tensor / pipeline / data parallel layout, without megatron model code and without ever holding
more than one chunk.

What is written is what megatron-core's ``dist_checkpointing.save`` would write from a model
at the target layout: one ``__{rank}_0.distcp`` per target rank holding exactly the chunks
that rank would save (chunk offsets/sizes by megatron's own sharding of GPT keys), then
``.metadata`` (torch DCP's own classes), ``common.pt`` (copied: lr scheduler, optimizer
param_groups and rng are layout-independent there) and ``metadata.json`` last.

Target chunking per key (checked against the source's chunking at its own TP, and in the
tests against megatron-core's ``sharded_state_dict`` at the target layout):

* column-parallel, dim 0 split in TP equal parts: ``self_attention.linear_qkv`` (weight, bias:
  mcore keeps whole query groups per rank, contiguous), ``embedding.word_embeddings``,
  ``output_layer``;
* gated ``mlp.linear_fc1`` (SwiGLU, the global tensor is ``[gate; up]``): rank r holds gate_r and
  up_r, 2*TP chunks on dim 0 (a non-gated fc1, recognised from the source chunks, is plain
  column-parallel);
* row-parallel, dim 1 split in TP parts: ``self_attention.linear_proj.weight``,
  ``mlp.linear_fc2.weight`` (their biases are replicated);
* replicated (one chunk, written by TP rank 0): norms (``*layernorm*``, ``*layer_norm_*``,
  ``*norm.weight/bias``), position embeddings, row-parallel biases;
* stacked ``decoder.layers.*`` keys carry a leading layer axis stored one layer per chunk; the
  layers of PP stage s are ``[s*L/PP, (s+1)*L/PP)`` (per-layer ``decoder.layers.{i}.*`` keys
  likewise); ``embedding.*`` lives on stage 0, ``output_layer.*`` / ``decoder.final_*`` on the
  last stage;
* ``optimizer.state.<state>.<model key>`` (megatron's ``fully_reshardable`` and the
  non-distributed optimizer) follow their parameter;
* the writer of a chunk is the rank ``tp + TP*(dp + DP*pp)`` (megatron's default order
  tp-cp-ep-dp-pp) of its (TP rank, stage); replicas across DP share the writes, greedily
  balanced by bytes (what the fully parallel save of SkyRL does).

Each target rank reads only the source chunks overlapping its own chunks, by ranged reads
(:meth:`~ckptctl.formats.megatron.MegatronReader.read_region`: a large source chunk needed only
in part is read by the byte span of that part); a target chunk identical to a source chunk is
copied byte for byte. Every source chunk's CRC-32 is checked on the bytes read (chunks read in
parts add up their parts, and the rest is read before the commit), so corrupted bytes fail the
run instead of being written out under fresh CRCs. Memory is bounded by one target chunk plus
its source bytes, whatever the model size. From an object store the source chunks are read
ahead in the order the target ranks read them (:func:`planned_reads`,
:class:`ckptctl.ops.transfer.ReadAheadScope`; ``concurrency`` / ``max_memory`` as export-hf's),
and to one a data file uploads while the next is written.

Optimizer state in a layout-bound format (``dp_reshardable``: flattened per-bucket buffers,
``dp_zero_gather_scatter``) can only change its data-parallel size: it is then copied as is
(megatron re-splits it over DP at load). For a TP/PP/EP change of ``dp_reshardable`` state, and
for any change of the N-D flattened ``fully_sharded_model_space`` (which megatron-core 0.16
cannot load), :class:`~ckptctl.formats.distopt.DistOptReader` maps the buckets (or pieces) back
to parameters and presents them as per-parameter tensors, which are
resharded like ``fully_reshardable`` state and written in that format (``common.pt`` rewritten
to say so, with the optimizer's param_groups); when that mapping cannot be established, and for
the other layout-bound formats, a TP/PP change needs ``drop_optimizer=True``. An MoE target
gets the optimizer structure megatron-core builds there (:func:`_rechain`): a dense
(``chained_0.``) + expert (``chained_1.``) chain at EP > 1, ONE unprefixed optimizer at EP 1;
keys are renamed and ``common.pt``'s optimizer record rewritten when that differs from the
source's. Megatron-LM's per-(PP, TP)-rank ``rng_state`` objects are dropped when TP or PP
changes (megatron itself skips the RNG state then).

Output safety is :class:`ckptctl.output_dir.OutputDir`: temp sibling + atomic rename locally,
data first and ``.metadata``/``common.pt``/``metadata.json`` last on S3/GCS, refusal of a
non-empty destination without ``overwrite``, never inside the source.

Modes: one process doing every target rank's work in turn (a laptop), or one process per
torchrun worker (``python -m ckptctl.ops.reshard_worker`` / any caller under torchrun with
``WORLD_SIZE`` > 1): target ranks are split across the processes, the storage entries are
gathered to process 0 (gloo; also on GPU nodes: only small Python objects travel), which
writes the index files and commits.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from ckptctl.errors import CkptctlError, CorruptFileError, NotACheckpointError, NotFoundError, UsageError
from ckptctl.formats.base import Piece, TensorInfo, dtype_size
from ckptctl.formats.dcp_writer import (COMMON_FILE, METADATA_FILE, METADATA_JSON, DcpFileWriter, build_metadata,
                                        data_file_name, metadata_bytes)
from ckptctl.formats.distopt import DistOptReader, fully_reshardable_common
from ckptctl.formats.megatron import _OPT_RE, _OPT_STATE_RE, MegatronReader, _model_key
from ckptctl.formats.megatron_sharding import (COLUMN, EXPERT_SPLIT as _EXPERT_SPLIT, FIRST_STAGE as _FIRST_STAGE,
                                                GATED, LAST_STAGE as _LAST_STAGE, REPLICATED, ROW,
                                                check_source_split as _check_source_split,
                                                layer_and_suffix as _layer_and_suffix, split_kind,
                                                stage_of_layer as _stage_of_layer, tp_blocks)
from ckptctl.formats.side_files import read_side_file
from ckptctl.formats.torchzip import check_archive
from ckptctl.ops.distributed import error_payload as _error_payload
from ckptctl.ops.distributed import process_group, raise_payload as _raise_payload, under_torchrun
from ckptctl.ops.export import HF_DIR, resolve_component
from ckptctl.ops.transfer import BackgroundPublish, ReadAheadScope, Transfer
from ckptctl.formats.manifest import ManifestCheck
from ckptctl.output_dir import RESHARD, OutputDir, clean_dead_scratch, make_scratch, refuse_overlap, signals_deferred
from ckptctl.storage import Store, open_store, write_local_file
from ckptctl.tree import MEGATRON

_OBJECT_KEY_RE = re.compile(r"^(.*)/shard_([\d.]+)_([\d.]+)$")

#: The optimizer formats whose state is one tensor per parameter with the parameter's shape.
PER_PARAM_FORMATS = ("fully_reshardable", "non_distributed", "fp32")


@dataclass
class ReshardSummary:
    source: str
    destination: str
    source_layout: dict[str, Any]
    target_layout: dict[str, Any]
    optimizer: str  # "resharded" | "copied" (DP change only) | "dropped" | "absent"
    optimizer_format: str | None = None
    optimizer_output_format: str | None = None  # when it differs from the source's (see ReshardPlan)
    tensors: int = 0
    chunks: int = 0
    chunks_copied_verbatim: int = 0
    objects: int = 0
    bytes: int = 0  # tensor data written (elements x element size)
    bytes_read: int = 0  # source bytes fetched for tensor data (all processes)
    files: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key (or group) -> why
    warnings: list[str] = field(default_factory=list)
    processes: int = 1
    replaced: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTask:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    nbytes: int
    verbatim: Piece | None = None  # a source chunk with exactly these offsets and sizes
    source_key: str | None = None  # the source tensor, when its name changes (MoE optimizer chain)


@dataclass(frozen=True)
class ObjectTask:
    key: str
    file: str  # source file (relative to the component) and byte range
    byte_offset: int
    byte_length: int


@dataclass
class ReshardPlan:
    """Everything decided before the first byte is read: per target rank its chunks/objects."""

    tp: int
    pp: int
    dp: int
    source_layout: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, global shape)
    objects: list[str]
    chunks: dict[int, list[ChunkTask]]
    object_tasks: dict[int, list[ObjectTask]]
    optimizer: str
    optimizer_format: str | None
    dropped: dict[str, str]
    warnings: list[str]
    ep: int | None = None  # MoE targets: expert-parallel and expert-tensor-parallel sizes
    etp: int | None = None
    #: the optimizer format written when it differs from the source's (dp_reshardable mapped to
    #: parameters and written as fully_reshardable, with common.pt rewritten to say so)
    optimizer_output_format: str | None = None
    #: MoE: whether the target's optimizer is megatron's dense + expert chain (EP > 1) when that
    #: differs from the source's (keys renamed, common.pt's optimizer record rewritten); else None
    optimizer_chained: bool | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def rank_bytes(self, rank: int) -> int:
        return sum(t.nbytes for t in self.chunks.get(rank, ()))

    @property
    def total_bytes(self) -> int:
        return sum(self.rank_bytes(r) for r in range(self.world))

    def writer_ranks(self) -> list[int]:
        return [r for r in range(self.world) if self.chunks.get(r) or self.object_tasks.get(r)]


def _balanced(items: list, dp: int, size: Callable[[Any], int]) -> list[list]:
    """Split ``items`` over ``dp`` replicas, largest first onto the least loaded (stable)."""
    if dp == 1:
        return [list(items)]
    loads = [0] * dp
    out: list[list] = [[] for _ in range(dp)]
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))
    for i in order:
        d = min(range(dp), key=lambda j: (loads[j], j))
        out[d].append(i)
        loads[d] += size(items[i])
    return [[items[i] for i in sorted(idx)] for idx in out]


def plan_reshard(reader, *, tp: int, pp: int, dp: int = 1, ep: int | None = None, etp: int | None = None,
                 drop_optimizer: bool = False, summary: dict | None = None,
                 hf_config: dict | None = None) -> ReshardPlan:
    """Decide every target chunk and its writer rank from the source's metadata (no data read).

    ``reader``: a :class:`~ckptctl.formats.megatron.MegatronReader`; ``summary``: its
    ``summary(common=False)`` if already computed (the optimizer format comes from the key
    names; ``common.pt`` is copied, never unpickled). ``hf_config``: the component's
    ``huggingface/config.json``, when there is one: TP must divide its attention heads and
    query groups, and a vocabulary padding that megatron would choose differently at the new
    TP is reported. ``ep``/``etp``: expert-parallel and expert-tensor-parallel sizes of an MoE
    target (default: EP 1, ETP = TP, as SkyRL configures); the experts of each layer go to EP
    ranks in blocks of E/EP, each expert split over ETP, with megatron's expert rank order
    (etp-ep-dp-pp)."""
    for name, v in (("--tp", tp), ("--pp", pp), ("--dp", dp), ("--ep", ep), ("--etp", etp)):
        if v is not None and (not isinstance(v, int) or v < 1) or (v is None and name in ("--tp", "--pp", "--dp")):
            raise UsageError(f"{name} must be a positive integer, not {v!r}")
    summary = summary if summary is not None else reader.summary(common=False)
    problems = [p for p in summary.get("problems") or () if "metadata.json" not in p]
    if problems:
        raise CkptctlError(f"{reader.store.url}: cannot reshard a damaged checkpoint: {problems[0]}")
    infos = reader.tensor_infos()
    objects = reader.objects()
    raw_keys = set(reader._load_metadata().state_dict_metadata)
    skipped = sorted(raw_keys - set(infos) - {o.name for o in objects})
    if skipped:
        raise UsageError(f"cannot reshard tensor-valued {skipped[0]!r} (TE FP8 extra state?)"
                         + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""))
    par = summary.get("parallel") or {}
    tp_src, pp_src, dp_src = par.get("tp"), par.get("pp"), par.get("dp")
    if not tp_src:
        raise NotACheckpointError(f"{reader.store.url}: cannot tell the source tensor-parallel size from its chunks")
    source_layout = {"tp": tp_src, "pp": pp_src, "dp": dp_src, "writer_ranks": par.get("writer_ranks")}
    model_facts = summary.get("model") or {}
    num_layers = model_facts.get("num_layers")
    if not num_layers:
        raise NotACheckpointError(f"{reader.store.url}: no decoder layers found")
    if num_layers % pp:
        raise UsageError(f"--pp {pp} does not divide the {num_layers} decoder layers (uneven pipeline stages "
                         "are not supported)")
    experts = _expert_layout(infos, par, tp=tp, dp=dp, ep=ep, etp=etp, hf_config=hf_config)
    same_mp = tp == tp_src and pp == pp_src and (experts is None or (experts.ep, experts.etp) == experts.source)
    warnings: list[str] = []
    dropped: dict[str, str] = {}
    if hf_config:
        warnings += _check_hf_config(hf_config, tp, tp_src, infos)

    # -- the optimizer: which keys, which format, what to do ---------------------------------
    opt_fmt = (summary.get("optimizer") or {}).get("format")
    optimizer_output = None
    opt_tensors = [k for k in infos if _OPT_RE.match(k)]
    opt_objects = [o for o in objects if _OPT_RE.match(o.key)]
    per_param = [k for k in opt_tensors if (m := _OPT_STATE_RE.match(k)) and (
        m.group(2) not in infos or infos[m.group(2)].shape == infos[k].shape)]
    per_param_set = set(per_param)
    layout_bound = [k for k in opt_tensors if k not in per_param_set] + [o.name for o in opt_objects]
    layout_bound_set = set(layout_bound)
    if not opt_tensors and not opt_objects:
        optimizer = "absent"
    elif drop_optimizer:
        optimizer = "dropped"
        for k in opt_tensors + [o.name for o in opt_objects]:
            dropped[k] = "--drop-optimizer"
        warnings.append("optimizer state dropped: load the output without the optimizer (common.pt still holds "
                        "its param_groups and step)")
    elif not layout_bound:
        optimizer = "resharded"
    elif same_mp and opt_fmt != "fully_sharded_model_space":  # (which megatron-core 0.16 cannot load)
        optimizer = "copied"
        if dp != dp_src:
            warnings.append(f"optimizer state ({opt_fmt}) copied as is: megatron-core re-splits it over the new "
                            f"data-parallel size {dp} when it loads it")
    elif opt_fmt in ("dp_reshardable", "fully_sharded_model_space") and hasattr(reader, "per_parameter_state"):
        # TP/PP/EP change: the flat buckets (formats.distopt) or N-D flattened pieces (formats.flattened)
        # mapped back to parameters, written as megatron's per-parameter fully_reshardable state,
        # resharded like the weights below
        virtual = reader.per_parameter_state(summary)
        fully_reshardable_common(reader)  # common.pt must be rewritable: fail before writing anything
        for k in opt_tensors:
            del infos[k]
        infos.update(virtual)
        objects = [o for o in objects if not _OPT_RE.match(o.key)]
        layout_bound, layout_bound_set = [], set()
        optimizer, optimizer_output = "resharded", "fully_reshardable"
        warnings.append(f"optimizer state ({opt_fmt}) mapped to parameters and written as fully_reshardable: "
                        "load it with that format (megatron-core: distrib_optim_sharding_type 'fully_reshardable'; "
                        "SkyRL: dist_ckpt_optim_fully_reshardable=true)")
    else:
        example = layout_bound[0]
        raise UsageError(
            f"the optimizer state is in megatron's {opt_fmt or 'layout-bound'} format ({example!r}...), which can "
            f"only change its data-parallel size (source TP={tp_src} PP={pp_src}, asked TP={tp} PP={pp}); keep "
            f"--tp {tp_src} --pp {pp_src}, or pass --drop-optimizer to write the model weights only")
    # MoE: one optimizer at EP 1, a dense + expert chain at EP > 1 (keys and common.pt follow)
    rename, optimizer_chained = _rechain(infos, experts, optimizer_output or opt_fmt) if optimizer == "resharded" \
        else ({}, None)
    if optimizer_chained is not None:
        fully_reshardable_common(reader, chained=optimizer_chained)  # refused now if it cannot be rewritten
        warnings.append(
            f"optimizer state keyed for EP {experts.ep}: " + (
                "a dense (chained_0.) and an expert (chained_1.) optimizer, as megatron-core chains them when "
                "experts are expert-parallel" if optimizer_chained else
                "ONE optimizer without chained_N. prefixes, as megatron-core builds it when experts are not "
                "expert-parallel; the expert param groups merged into the dense ones in common.pt"))

    # -- tensors ---------------------------------------------------------------------------
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    by_group: dict[tuple[int, int], list[ChunkTask]] = defaultdict(list)  # (tp rank, stage) -> chunks
    # routed experts: (rank within the stage of the expert-DP replica 0, stage) -> chunks
    expert_groups: dict[tuple[int, int], list[ChunkTask]] = defaultdict(list)
    kinds: dict[str, str] = {}
    for key, info in infos.items():
        if key in dropped:
            continue
        tensors[key] = (info.dtype, tuple(info.shape))
        model_key = _model_key(key)
        layout, layer, _ = _layer_and_suffix(model_key)
        item = _dtype_size(info.dtype)
        exact = {(p.offsets, p.sizes): p for p in info.pieces}
        if key in layout_bound_set or (same_mp and split_kind(model_key) is None):
            # source geometry, source (TP rank, stage)
            for p in info.pieces:
                if p.rank is None:
                    raise CkptctlError(f"{key}: a chunk in {p.file}, which is not a rank's file")
                src_tp_rank, src_stage = _src_coords(p.rank, tp_src, pp_src, dp_src)
                by_group[(src_tp_rank, src_stage)].append(
                    ChunkTask(key, p.offsets, p.sizes, math.prod(p.sizes) * item, p))
            continue
        expert_kind = _EXPERT_SPLIT.get(_layer_and_suffix(model_key)[2])
        if expert_kind is not None:
            layered = layout == "stacked"
            for task, stage, base in _expert_chunks(key, info, expert_kind, experts, layered, layer, num_layers, pp,
                                                    item, exact):
                expert_groups[(base, stage)].append(task)
            continue
        kind = split_kind(model_key)
        if kind is None:
            raise UsageError(f"{key}: no rule for how megatron-core shards this key over TP/PP (GPT and MoE keys "
                             "only: multi-token prediction and unknown modules are not supported)")
        layered = layout == "stacked"
        if kind in (GATED, COLUMN, ROW) and len(info.shape) - (1 if layered else 0) >= 1:
            cache_key = model_key if model_key in infos else key
            if cache_key not in kinds:
                src_info = infos.get(model_key, info)
                kinds[cache_key] = _check_source_split(src_info, kind, tp_src, layered)
            kind = kinds[cache_key]
        elif kind != REPLICATED:
            raise UsageError(f"{key}: unexpected shape {list(info.shape)} for a {kind} tensor")
        per_layer_shape = tuple(info.shape[1:]) if layered else tuple(info.shape)
        blocks = tp_blocks(kind, per_layer_shape, tp, key=key)
        if layered:
            if info.shape[0] != num_layers:
                raise UsageError(f"{key}: leading axis {info.shape[0]} != {num_layers} layers")
            for i in range(num_layers):
                stage = _stage_of_layer(i, num_layers, pp)
                for r, off, size in blocks:
                    o, s = (i, *off), (1, *size)
                    by_group[(r, stage)].append(ChunkTask(key, o, s, math.prod(s) * item, exact.get((o, s))))
        else:
            if layout == "per_layer":
                if layer >= num_layers:
                    raise UsageError(f"{key}: layer {layer} beyond {num_layers} layers")
                stage = _stage_of_layer(layer, num_layers, pp)
            elif model_key.startswith(_FIRST_STAGE):
                stage = 0
            elif model_key.startswith(_LAST_STAGE):
                stage = pp - 1
            else:
                raise UsageError(f"{key}: cannot tell which pipeline stage holds it")
            for r, off, size in blocks:
                by_group[(r, stage)].append(ChunkTask(key, off, size, math.prod(size) * item, exact.get((off, size))))

    # -- objects (ShardedObjects, _extra_state) ----------------------------------------------
    obj_by_group: dict[tuple[int, int], list[ObjectTask]] = defaultdict(list)
    object_keys = []
    for o in objects:
        if o.name in dropped:
            continue
        task = ObjectTask(o.name, o.file, o.byte_offset, o.byte_length)
        m = _OBJECT_KEY_RE.match(o.name)
        if o.key.startswith("rng_state") and not same_mp:
            dropped[o.name] = "per-(PP, TP)-rank RNG state does not map to a new TP/PP layout"
            continue
        if "._extra_state" in o.key and m:
            model_key = o.key[: o.key.index("._extra_state")]
            layout, layer, _ = _layer_and_suffix(model_key)
            offs = [int(x) for x in m.group(2).split(".")]
            if layout == "per_layer":
                stage = _stage_of_layer(layer, num_layers, pp)
            elif layout == "stacked":
                stage = _stage_of_layer(offs[0], num_layers, pp) if m.group(3).split(".")[0] == str(num_layers) else 0
            elif model_key.startswith(_LAST_STAGE):
                stage = pp - 1
            else:
                stage = 0
            obj_by_group[(0, stage)].append(task)
        elif same_mp:
            if o.rank is None:
                raise CkptctlError(f"{o.name}: stored in {o.file}, which is not a rank's file")
            obj_by_group[_src_coords(o.rank, tp_src, pp_src, dp_src)].append(task)
        else:
            raise UsageError(f"{o.name}: a non-tensor object whose meaning for a new TP/PP layout is unknown")
        object_keys.append(o.name)
    if any(k.startswith("rng_state") for k in dropped):
        warnings.append("Megatron-LM rng_state objects dropped (TP/PP changed): load with --no-load-rng or let "
                        "the trainer reseed")

    # -- writer ranks: rank = tp + TP*(dp + DP*pp) -------------------------------------------
    chunks: dict[int, list[ChunkTask]] = defaultdict(list)
    object_tasks: dict[int, list[ObjectTask]] = defaultdict(list)
    for (r, stage), items in by_group.items():
        for d, part in enumerate(_balanced(items, dp, lambda t: t.nbytes)):
            chunks[r + tp * (d + dp * stage)].extend(part)
    if expert_groups:
        # expert ranks within a stage: etp + ETP*(ep + EP*expert_dp); the expert-DP replicas share the writes
        replicas = tp * dp // (experts.ep * experts.etp)
        for (base, stage), items in expert_groups.items():
            for d, part in enumerate(_balanced(items, replicas, lambda t: t.nbytes)):
                chunks[base + experts.ep * experts.etp * d + tp * dp * stage].extend(part)
    for (r, stage), items in obj_by_group.items():
        for d, part in enumerate(_balanced(items, dp, lambda t: t.byte_length)):
            object_tasks[r + tp * (d + dp * stage)].extend(part)
    if rename:
        tensors = {rename.get(k, k): v for k, v in tensors.items()}
        for r, items in chunks.items():
            chunks[r] = [replace(t, key=rename[t.key], source_key=t.key) if t.key in rename else t for t in items]
    plan = ReshardPlan(tp, pp, dp, source_layout, tensors, object_keys, dict(chunks), dict(object_tasks),
                       optimizer, opt_fmt, dropped, warnings, optimizer_output_format=optimizer_output,
                       optimizer_chained=optimizer_chained)
    if experts is not None:
        plan.ep, plan.etp = experts.ep, experts.etp
        source_layout.update(ep=experts.source[0], etp=experts.source[1])
    return plan


@dataclass(frozen=True)
class _ExpertLayout:
    num_experts: int
    ep: int
    etp: int
    source: tuple[int | None, int | None]  # the source's (EP, ETP)


def _expert_layout(infos: dict[str, TensorInfo], par: dict, *, tp: int, dp: int, ep: int | None, etp: int | None,
                   hf_config: dict | None) -> _ExpertLayout | None:
    """The target expert layout of an MoE checkpoint, validated as megatron-core builds it
    (EP divides the experts; EP x ETP divides the ranks of a stage, TP x DP); None for a dense
    checkpoint (where --ep/--etp are usage errors)."""
    fc = [t for k, t in infos.items() if _EXPERT_SPLIT.get(_layer_and_suffix(k)[2])]
    if not fc:
        if ep is not None or etp is not None:
            raise UsageError("--ep/--etp are for mixture-of-experts checkpoints; this one has no routed experts")
        return None
    stacked = _layer_and_suffix(fc[0].name)[0] == "stacked"
    num_experts = fc[0].shape[1 if stacked else 0]
    from ckptctl.formats.moe import num_routed_experts

    if hf_config and num_routed_experts(hf_config) not in (0, num_experts):
        raise CkptctlError(f"the checkpoint holds {num_experts} routed experts, huggingface/config.json says "
                           f"{num_routed_experts(hf_config)}")
    ep = 1 if ep is None else ep
    etp = tp if etp is None else etp
    if num_experts % ep:
        raise UsageError(f"--ep {ep} does not divide the model's {num_experts} routed experts")
    if (tp * dp) % (ep * etp):
        raise UsageError(f"--ep {ep} x --etp {etp} = {ep * etp} does not divide the {tp * dp} ranks of a pipeline "
                         f"stage (TP {tp} x DP {dp}): megatron-core carves the expert ranks out of them")
    return _ExpertLayout(num_experts, ep, etp, (par.get("ep"), par.get("etp")))


def _expert_chunks(key: str, info: TensorInfo, kind: str, experts: _ExpertLayout, layered: bool, layer: int | None,
                   num_layers: int, pp: int, item: int, exact: dict) -> Iterable[tuple[ChunkTask, int, int]]:
    """(chunk, stage, rank within the stage for expert-DP replica 0) of every target chunk of a
    routed-expert tensor: one per (layer, expert, ETP part)."""
    lead = 2 if layered else 1
    if len(info.shape) != lead + 2 or info.shape[lead - 1] != experts.num_experts:
        raise UsageError(f"{key}: unexpected shape {list(info.shape)} for routed experts")
    block = experts.num_experts // experts.ep
    parts = tp_blocks(kind, tuple(info.shape[lead:]), experts.etp, key=key)
    layers = range(num_layers) if layered else [layer]
    if layered and info.shape[0] != num_layers:
        raise UsageError(f"{key}: leading axis {info.shape[0]} != {num_layers} layers")
    for i in layers:
        stage = _stage_of_layer(i, num_layers, pp)
        for e in range(experts.num_experts):
            for etp_rank, off, size in parts:
                o = (i, e, *off) if layered else (e, *off)
                s = (1, 1, *size) if layered else (1, *size)
                yield (ChunkTask(key, o, s, math.prod(s) * item, exact.get((o, s))), stage,
                       etp_rank + experts.etp * (e // block))


def _rechain(infos: dict[str, TensorInfo], experts: _ExpertLayout | None, fmt: str | None
             ) -> tuple[dict[str, str], bool | None]:
    """megatron-core 0.16's optimizer structure for an MoE target: expert params are expert-parallel
    (``allreduce`` False) only when EP > 1, and only then does ``get_megatron_optimizer`` chain a
    dense (``chained_0.``) and an expert (``chained_1.``) optimizer; at EP 1 there is one optimizer
    whose keys carry no prefix. Returns (source key -> target key of the per-parameter optimizer
    tensors whose name changes, the target's chained-ness when it differs from the source's, else
    None). Only megatron's distributed-optimizer state written as ``fully_reshardable`` can be
    restructured (its common.pt record is then rewritten, :func:`~ckptctl.formats.distopt.rechain_record`)."""
    if experts is None:
        return {}, None
    chain_of = {k: m.group(1) for k in infos if (m := _OPT_RE.match(k))}
    if not chain_of:
        return {}, None
    source_ep = experts.source[0]
    source_chained = source_ep > 1 if source_ep else set(chain_of.values()) != {None}
    chained = experts.ep > 1
    if chained == source_chained:
        return {}, None
    change = (f"EP {source_ep or '?'} -> {experts.ep}: megatron-core has one optimizer at EP 1 and a dense + expert "
              "chain at EP > 1")
    if fmt != "fully_reshardable":
        raise UsageError(f"the {fmt or 'unknown'} optimizer state cannot be restructured for {change} (only the "
                         "distributed optimizer's dp_reshardable / fully_reshardable state can); pass "
                         "--drop-optimizer to write the model weights only")
    rename = {}
    for key, label in chain_of.items():
        m = _OPT_STATE_RE.match(key)
        if not m:
            raise UsageError(f"{key}: optimizer state that is not per parameter cannot be restructured for {change}; "
                             "pass --drop-optimizer to write the model weights only")
        expert = _layer_and_suffix(m.group(2))[2] in _EXPERT_SPLIT
        if label is not None and label != f"chained_{int(expert)}":
            raise UsageError(f"{key}: the state of an {'expert' if expert else 'dense'} parameter in optimizer "
                             f"{label}, not the chain megatron-core builds ({change}); pass --drop-optimizer to "
                             "write the model weights only")
        bare = key if label is None else key[len(label) + 1:]
        target = f"chained_{int(expert)}.{bare}" if chained else bare
        if target != key:
            rename[key] = target
    return rename, chained


def _check_hf_config(config: dict, tp: int, tp_src: int, infos: dict) -> list[str]:
    """TP must divide the attention heads, and divide or be a multiple of the query groups
    (mcore >= 0.16 gives TP ranks parts of a group when there are fewer groups than ranks);
    warn about vocabulary padding."""
    heads = config.get("num_attention_heads")
    groups = config.get("num_key_value_heads") or heads
    if isinstance(heads, int) and heads % tp:
        raise UsageError(f"--tp {tp} does not divide the model's {heads} attention heads")
    if isinstance(groups, int) and groups % tp and tp % groups:
        raise UsageError(f"--tp {tp} neither divides nor is a multiple of the model's {groups} query groups "
                         "(num_key_value_heads)")
    notes = []
    if isinstance(groups, int) and groups < tp:
        notes.append(f"--tp {tp} over {groups} query groups: each KV head is replicated on {tp // groups} ranks, "
                     "which megatron-core loads from version 0.16 on (older versions require the query groups to "
                     "be divisible by TP)")
    vocab = config.get("vocab_size")
    emb = infos.get("embedding.word_embeddings.weight")
    if not isinstance(vocab, int) or emb is None or not emb.shape:
        return notes
    rows = emb.shape[0]

    def padded(t: int) -> int:  # Megatron-LM: make_vocab_size_divisible_by (128) x TP
        m = 128 * t
        return -(-vocab // m) * m

    if padded(tp_src) == rows and padded(tp) != rows:
        return notes + [f"the embedding keeps its {rows} rows (vocabulary {vocab} padded for TP={tp_src}); Megatron-LM with "
                f"make_vocab_size_divisible_by=128 would pad to {padded(tp)} rows at TP={tp}: configure the "
                f"trainer's padding so that the model has {rows} rows"]
    return notes


def _src_coords(rank: int, tp_src: int, pp_src: int | None, dp_src: int | None) -> tuple[int, int]:
    """(TP rank, PP stage) of a source writer rank (default order tp-cp-ep-dp-pp)."""
    if not pp_src or not dp_src:
        raise CkptctlError("cannot tell the source pipeline/data-parallel sizes from the writer ranks")
    return rank % tp_src, rank // (tp_src * dp_src)


def _dtype_size(dtype: str) -> int:
    size = dtype_size(dtype)
    if not size:
        raise CkptctlError(f"unsupported dtype {dtype!r}")
    return size


# ---------------------------------------------------------------------------------------------
# doing it
# ---------------------------------------------------------------------------------------------
@dataclass
class RankResult:
    rank: int
    entries: list[tuple]
    file: str | None  # the data file (relative to the output), None when the rank writes nothing
    verbatim: int
    bytes_read: int


def write_rank(reader, plan: ReshardPlan, rank: int, staging: str, prefix: str = "",
               on_bytes: Callable[[int], None] | None = None) -> RankResult:
    """Write target rank ``rank``'s data file into ``staging`` (under ``prefix``)."""
    tasks = plan.chunks.get(rank, [])
    objs = plan.object_tasks.get(rank, [])
    if not tasks and not objs:
        return RankResult(rank, [], None, 0, 0)
    name = data_file_name(rank)
    rel = prefix + name
    store = reader.store
    verbatim = 0
    read_before = _bytes_read(store)
    def load(t: ChunkTask):
        """The chunk's bytes (a source blob copied as is) or its tensor (assembled)."""
        p, source_key = t.verbatim, t.source_key or t.key
        if p is not None and (p.file, p.byte_offset) not in reader._transforms:
            return reader.read_chunk_bytes(p, source_key)  # CRC-checked: copied bytes are good bytes
        return reader.read_region(source_key, t.offsets, t.sizes)

    # One chunk ahead: the next chunk is read and assembled while this one is serialised.
    from concurrent.futures import ThreadPoolExecutor

    with DcpFileWriter(os.path.join(staging, *rel.split("/")), name) as w, ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(load, tasks[0]) if tasks else None
        for i, t in enumerate(tasks):
            data = ahead.result()
            ahead = pool.submit(load, tasks[i + 1]) if i + 1 < len(tasks) else None
            if isinstance(data, (bytes, memoryview)):  # (a view: the bytes read ahead)
                w.add_blob(t.key, t.offsets, t.sizes, data)
                verbatim += 1
            else:
                w.add_tensor(t.key, t.offsets, data)
            del data
            if on_bytes:
                on_bytes(t.nbytes)
        for o in objs:
            data = store.read_range(o.file, o.byte_offset, o.byte_offset + o.byte_length)
            if len(data) != o.byte_length:
                raise CkptctlError(f"{store.url_of(o.file)}: truncated object {o.key}")
            check_archive(data, f"{store.url_of(o.file)} (bytes {o.byte_offset}+{o.byte_length}, {o.key})")
            w.add_bytes(o.key, data)
    return RankResult(rank, [e.as_tuple() for e in w.entries], rel, verbatim, _bytes_read(store) - read_before)


def planned_reads(reader, plan: ReshardPlan, ranks: Iterable[int]) -> list[tuple[str, int, int]]:
    """``(file, start, end)`` of the source reads :func:`write_rank` makes for ``ranks``, in
    order: per rank, its chunks' source chunks (:meth:`MegatronReader.planned_reads`), then its
    objects. The plan of a read-ahead."""
    reads: list[tuple[str, int, int]] = []
    for rank in ranks:
        tasks = plan.chunks.get(rank, [])
        reads += reader.planned_reads([(t.source_key or t.key, t.offsets, t.sizes) for t in tasks])
        reads += [(o.file, o.byte_offset, o.byte_offset + o.byte_length) for o in plan.object_tasks.get(rank, [])]
    return reads


def _write_ranks(reader, plan: ReshardPlan, ranks: range, outdir: OutputDir, prefix: str,
                 on_bytes: Callable[[int], None], published: list[str],
                 transfer: Transfer | None = None) -> list[RankResult]:
    """Write the target ranks ``ranks`` into ``outdir``; each data file is published as soon as
    it is written (object stores: uploaded, so local disk holds one or two files at a time) and
    added to ``published``. Ends with the CRC checks of source chunks read only in parts (a
    corrupt source fails here, before anything is committed). ``transfer``: from an object
    store, the source chunks are read ahead; to one, a file uploads while the next is written."""
    transfer = transfer or Transfer.make()
    store = reader.store
    read_budget, upload_budget = transfer.budgets(not store.is_local, not outdir.is_local)
    outdir.limit_uploads(upload_budget, transfer.concurrency)
    results = []
    with ReadAheadScope() as read_ahead, \
            BackgroundPublish(outdir.publish, not outdir.is_local and transfer.concurrency > 1, published) as publish:
        if read_budget and transfer.concurrency > 1 and not store.is_local:
            read_ahead.start(store, planned_reads(reader, plan, ranks), read_budget, transfer.concurrency)
        for rank in ranks:
            res = write_rank(reader, plan, rank, outdir.staging, prefix, on_bytes)
            if res.file:
                publish([res.file])
            results.append(res)
    reader.finish_crc_checks()
    return results


def _commit(reader, plan: ReshardPlan, results: list[RankResult], outdir: OutputDir, prefix: str,
            uploaded: Iterable[str] = ()) -> list[str]:
    """``.metadata``, ``common.pt``, ``metadata.json`` and the component's ``huggingface/``
    (config + tokenizer) into the staging directory, then the commit; returns the files. The
    copied files are checked first (:mod:`ckptctl.formats.side_files`): damage is refused."""
    store = reader.store

    def copied(rel: str) -> bytes:
        return read_side_file(store, rel, extra_stand_ins=reader.extra_stand_ins)

    def put(rel: str, data: bytes) -> None:
        write_local_file(os.path.join(outdir.staging, *rel.split("/")), data)

    entries = [e for r in results for e in r.entries]
    md = build_metadata(plan.tensors, plan.objects, entries,
                        checkpoint_id=outdir.store.url_of(prefix.rstrip("/")))
    put(prefix + METADATA_FILE, metadata_bytes(md))
    try:
        if plan.optimizer_output_format == "fully_reshardable" or plan.optimizer_chained is not None:
            put(prefix + COMMON_FILE, fully_reshardable_common(reader, chained=plan.optimizer_chained))
        else:
            put(prefix + COMMON_FILE, copied(prefix + COMMON_FILE))
    except NotFoundError:
        pass
    put(prefix + METADATA_JSON, copied(prefix + METADATA_JSON))
    try:  # a listing of huggingface/ only: the whole component was listed once already
        hf_files = [f.path for f in store.child(HF_DIR).walk()]
    except CkptctlError:
        hf_files = []
    for rel in hf_files:
        put(f"{HF_DIR}/{rel}", copied(f"{HF_DIR}/{rel}"))
    return outdir.commit(uploaded=uploaded)


def _hf_config(comp: Store) -> dict | None:
    """The component's ``huggingface/config.json``, or None when there is none; a corrupt one is
    an error (the target checks depend on it: they are never skipped silently)."""
    rel = f"{HF_DIR}/config.json"
    try:
        config = comp.read_json(rel)
    except NotFoundError:
        return None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{comp.url_of(rel)}: corrupt file, not a JSON object")
    return config


def _plan(reader, comp: Store, **plan_args) -> ReshardPlan:
    """:func:`plan_reshard` with the component's HF config; without one, the plan says which
    checks of the target could not be made."""
    config = _hf_config(comp)
    plan = plan_reshard(reader, hf_config=config, **plan_args)
    if config is None and plan.tp != plan.source_layout.get("tp"):
        plan.warnings.append(f"no {HF_DIR}/config.json: --tp {plan.tp} was not checked against the attention heads, "
                             "query groups and vocabulary padding (megatron-core refuses a target that does not "
                             "fit them when it builds the model)")
    return plan


class _ReadCounter:
    """Counts the bytes a store's ``read_range`` returns (installed on the instance)."""

    def __init__(self, store: Store):
        self.total = 0
        self._lock = threading.Lock()
        self._read = store.read_range
        store.read_range = self

    def __call__(self, rel: str, start: int, end: int) -> bytes:
        data = self._read(rel, start, end)
        with self._lock:
            self.total += len(data)
        return data


def _bytes_read(store: Store) -> int:
    counter = getattr(store, "read_range", None)
    return counter.total if isinstance(counter, _ReadCounter) else 0


def _open_source(src: str, component: str, endpoint_url: str | None) -> tuple[Store, Store, str, MegatronReader]:
    """(the store ``src`` names, the store rooted at the Megatron component, its nesting prefix
    '' or 'dist_ckpt/', a reader of it). ``src`` is the component directory (the reader finds
    ``.metadata`` or verl's ``dist_ckpt/.metadata``), else a step or tree holding ``component``."""
    src_store = open_store(src, endpoint_url=endpoint_url)
    comp, reader = src_store, MegatronReader(src_store)
    try:
        prefix = reader.prefix
    except NotFoundError:
        parent, found, _, _ = resolve_component(src_store, component)
        if found.backend != MEGATRON:
            raise UsageError(f"{parent.url_of(found.path)}: a {found.backend} component; --tp/--pp/--dp are for Megatron checkpoints (FSDP: --world-size)")
        comp = parent.child(found.path)
        reader = MegatronReader(comp, nesting=found.nesting)
        prefix = reader.prefix
    _ReadCounter(comp)
    if reader.read_metadata_json() is None:
        raise CkptctlError(f"{comp.url}: no {prefix}{METADATA_JSON}: the source save did not finish")
    return src_store, comp, prefix, DistOptReader(reader)


def _prepare(src: str, out: str, *, component: str, endpoint_url: str | None, overwrite: bool, **plan_args
             ) -> tuple[Store, str, MegatronReader, ReshardPlan, OutputDir]:
    """What the only process (or process 0) does before writing: open the source, refuse a
    destination overlapping it, plan, and make the (not yet opened) output."""
    src_store, comp, prefix, reader = _open_source(src, component, endpoint_url)
    dst_store = open_store(out, endpoint_url=endpoint_url)
    refuse_overlap(src_store, dst_store)
    refuse_overlap(comp, dst_store)  # the component may be a link out of the source
    plan = _plan(reader, comp, **plan_args)
    commit_last = tuple(prefix + n for n in (METADATA_FILE, COMMON_FILE, METADATA_JSON))
    return comp, prefix, reader, plan, OutputDir(dst_store.url, overwrite=overwrite, commit_last=commit_last,
                                                 kind=RESHARD, source=comp.url, store=dst_store)


def _check_source_manifest(outdir: OutputDir, comp: Store, verify: bool) -> None:
    """With ``verify``, the source's manifest hashes (where it has one) are computed while the
    opened ``outdir`` is written, and checked before it is committed."""
    check = ManifestCheck.start_at(comp) if verify else None
    if check is not None:
        outdir.check_before_commit(check)


def _progress_counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """``on_bytes(n)`` for :func:`write_rank`: adds up and reports ``progress(done, total)``."""
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return on_bytes


def _summary(src_url: str, out: OutputDir, plan: ReshardPlan, results: list[RankResult], files: list[str],
             processes: int, started: float) -> ReshardSummary:
    return ReshardSummary(
        source=src_url, destination=out.dest, source_layout=plan.source_layout,
        target_layout={"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "world_size": plan.world,
                       "writer_ranks": len(plan.writer_ranks()),
                       **({"ep": plan.ep, "etp": plan.etp} if plan.ep is not None else {})},
        optimizer=plan.optimizer, optimizer_format=plan.optimizer_format,
        optimizer_output_format=plan.optimizer_output_format, tensors=len(plan.tensors),
        chunks=sum(len(v) for v in plan.chunks.values()), chunks_copied_verbatim=sum(r.verbatim for r in results),
        objects=len(plan.objects), bytes=plan.total_bytes, bytes_read=sum(r.bytes_read for r in results),
        files=files, dropped=dict(plan.dropped), warnings=list(plan.warnings), processes=processes,
        replaced=out.replaced, seconds=round(time.perf_counter() - started, 3))


def reshard_megatron(src: str, out: str, *, tp: int, pp: int, dp: int = 1, ep: int | None = None,
                     etp: int | None = None, overwrite: bool = False,
                     drop_optimizer: bool = False, endpoint_url: str | None = None,
                     progress: Callable[[int, int], None] | None = None, component: str = "policy",
                     distributed: bool | None = None, verify: bool = True, concurrency: int | None = None,
                     max_memory: int | str | None = None) -> ReshardSummary:
    """Reshard the Megatron ``torch_dist`` checkpoint at ``src`` for TP=``tp`` x PP=``pp`` x
    DP=``dp`` (an MoE one also for EP=``ep`` and ETP=``etp``, see :func:`plan_reshard`) into ``out`` (a new component directory: the checkpoint files, in ``dist_ckpt/``
    when the source is verl-nested, plus the source's ``huggingface/``).

    ``src``: the component directory (or a step / tree: ``component`` of the step chosen like
    export-hf). ``progress(done_bytes, total_bytes)`` after each chunk. ``distributed``: None
    detects torchrun (``WORLD_SIZE`` > 1 or an initialised process group). ``verify``: where the
    source has a ``ckptctl-manifest.json``, its files' hashes must match before the commit.
    ``concurrency`` / ``max_memory``: on object stores, per process, see
    :class:`ckptctl.ops.transfer.Transfer` (each process reads ahead the source chunks of its
    own target ranks; its data files upload while the next is written)."""
    transfer = Transfer.make(concurrency, max_memory)
    if distributed is None:
        distributed = under_torchrun()
    if distributed:
        return _reshard_distributed(src, out, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, overwrite=overwrite,
                                    drop_optimizer=drop_optimizer, endpoint_url=endpoint_url, progress=progress,
                                    component=component, verify=verify, transfer=transfer)
    started = time.perf_counter()
    comp, prefix, reader, plan, outdir = _prepare(src, out, component=component, endpoint_url=endpoint_url,
                                                  overwrite=overwrite, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp,
                                                  drop_optimizer=drop_optimizer)
    with outdir:
        _check_source_manifest(outdir, comp, verify)
        results = _write_ranks(reader, plan, range(plan.world), outdir, prefix,
                               _progress_counter(plan.total_bytes, progress), [], transfer)
        files = _commit(reader, plan, results, outdir, prefix)
    return _summary(comp.url, outdir, plan, results, files, 1, started)


# ---------------------------------------------------------------------------------------------
# several processes (torchrun)
# ---------------------------------------------------------------------------------------------
def _reshard_distributed(src: str, out: str, *, tp: int, pp: int, dp: int, overwrite: bool, drop_optimizer: bool,
                         ep: int | None = None, etp: int | None = None,
                         endpoint_url: str | None, progress, component: str, verify: bool = True,
                         transfer: Transfer | None = None) -> ReshardSummary:
    started = time.perf_counter()
    plan_args = dict(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, drop_optimizer=drop_optimizer)
    outdir: OutputDir | None = None
    with process_group() as pg:
        rank, world = pg.rank, pg.world
        try:
            # 1. process 0 checks everything and opens the output; the others learn how it went
            status: list[Any] = [None]
            if rank == 0:
                try:
                    comp, prefix, reader, plan, outdir = _prepare(src, out, component=component,
                                                                  endpoint_url=endpoint_url, overwrite=overwrite,
                                                                  **plan_args)
                    outdir.open().begin()  # object stores: old output no longer complete-looking, marker written
                    _check_source_manifest(outdir, comp, verify)
                    status = [("ok", outdir.staging if outdir.is_local else None)]
                except BaseException as exc:  # noqa: BLE001 - reported to every process
                    status = [("error", _error_payload(exc))]
            status = [pg.broadcast(status[0])]
            if status[0][0] == "error":
                _raise_payload(status[0][1])
            shared_staging = status[0][1]

            # 2. every process writes its share of the target ranks
            tmp = None
            result: tuple
            published: list[str] = []
            try:
                if rank != 0:
                    _, comp, prefix, reader = _open_source(src, component, endpoint_url)
                    plan = _plan(reader, comp, **plan_args)
                if shared_staging is not None:
                    mine = outdir if rank == 0 else OutputDir.attach(out, shared_staging, endpoint_url=endpoint_url)
                else:
                    clean_dead_scratch()
                    with signals_deferred():  # the scratch dir and tmp exist together
                        tmp = make_scratch(out)
                    mine = OutputDir.attach(out, os.path.join(tmp, "new"), endpoint_url=endpoint_url)
                ranks = range(rank, plan.world, world)
                on_bytes = _progress_counter(sum(plan.rank_bytes(r) for r in ranks), progress if rank == 0 else None)
                result = ("ok", _write_ranks(reader, plan, ranks, mine, prefix, on_bytes, published, transfer),
                          published)
            except BaseException as exc:  # noqa: BLE001
                result = ("error", _error_payload(exc), published)
            finally:
                if tmp:
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)

            # 3. process 0 gathers the storage entries, writes the index files last and commits
            gathered = pg.gather(result)
            final: list[Any] = [None]
            if rank == 0:
                uploaded = [f for g in gathered for f in g[2]]
                errors = [(i, g[1]) for i, g in enumerate(gathered) if g[0] == "error"]
                try:
                    if errors:
                        i, payload = errors[0]
                        _raise_payload(payload, f"process {i}: ")
                    all_results = sorted((r for g in gathered for r in g[1]), key=lambda r: r.rank)
                    if shared_staging is not None:
                        missing = [r.file for r in all_results if r.file and not os.path.exists(
                            os.path.join(shared_staging, *r.file.split("/")))]
                        if missing:
                            raise CkptctlError(f"{missing[0]} (written by another process) is not in {shared_staging}: "
                                               "the processes must share the destination's filesystem")
                    files = _commit(reader, plan, all_results, outdir, prefix, uploaded)
                    summary = _summary(comp.url, outdir, plan, all_results, files, world, started)
                    final = [("ok", summary)]
                except BaseException as exc:  # noqa: BLE001
                    if outdir is not None:
                        outdir.abort(uploaded=uploaded)
                    final = [("error", _error_payload(exc))]
            final = [pg.broadcast(final[0])]
            if final[0][0] == "error":
                _raise_payload(final[0][1])
            return final[0][1]
        finally:
            if outdir is not None and outdir.state == "open":
                outdir.abort()


__all__ = ["ReshardPlan", "ReshardSummary", "plan_reshard", "reshard_megatron", "split_kind", "tp_blocks",
           "write_rank"]
