"""``resolve-resume``: what SkyRL would load on restart, by SkyRL's own rules, plus the checks
SkyRL skips.

SkyRL's rules (``RayPPOTrainer.load_checkpoints`` and ``validate_consistency_for_latest_checkpoint``),
reproduced step by step, listing, following and parsing what SkyRL does:
- ``none``: start from scratch.
- ``latest``: no ``latest_ckpt_global_step.txt`` → start from scratch. Otherwise
  ``int(pointer.strip())`` (an empty or garbage pointer raises) and the step directory is
  ``global_step_{that int}`` (so ``05`` opens ``global_step_5``, and a zero-padded
  ``global_step_05`` directory is never opened). Then the tree root is listed (``ls``): every
  entry whose name starts with ``global_step_`` and that is a directory (symlinks followed,
  empty ones included; files are skipped) goes through ``int(name.split("global_step_")[1])``
  (``global_step_9_tmp`` raises), and the highest may exceed the pointer by at most
  ``ckpt_interval`` ("Inconsistent checkpoint folder"). Older releases list with ``os.listdir``,
  files included: a FILE named ``global_step_*`` that would break them fails here too, with a
  note that newer releases skip it.
- ``from_path``: ``resume_path`` must be set; its basename must contain ``global_step_`` and,
  when it starts with it, the rest must be an integer.
- Then the directory must exist (a symlink is followed) and hold ``trainer_state.pt``;
  ``data.pt`` is optional.
ckptctl additionally requires the chosen step to be complete (one definition, see ``tree``),
its files to pass the deep check (:mod:`ckptctl.formats.integrity`) and to still hold optimizer
state; ``fallback`` names the newest step of the current run (:class:`ckptctl.tree.CurrentRun`)
that passes. ``require_checkpoint`` turns "start from scratch" into a failure.
For a Megatron step it also tells whether the optimizer state loads at the parallelism of the
run's config (``trainer_state.pt``, read without torch): megatron-core reloads ``dp_reshardable``
state only at the TP/PP/EP it was written at (any DP), the per-parameter formats at any layout;
when it cannot, it names the ``convert-reshard`` command that can (:class:`OptimizerFit`).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from ckptctl.errors import BucketNotFoundError, CkptctlError, NotACheckpointError, NotFoundError, UsageError
from ckptctl.storage import Store, open_store
from ckptctl.tree import (MEGATRON, MODEL_COMPONENTS, POINTER_FILE, STEP_PREFIX, Component, Step, Tree,
                          canonical_step_name,
                          classify_step, scan_step, scan_tree)

MODES = ("latest", "from_path", "none")
RESUME = "resume"
SCRATCH = "scratch"
FAIL = "fail"


#: Optimizer formats megatron-core reloads only at the TP/PP/EP they were written at (any DP).
MODEL_PARALLEL_BOUND = ("dp_reshardable", "dp_zero_gather_scatter")
#: Formats megatron-core 0.16 (what SkyRL runs) loads at no layout: written by 0.13 and older
#: with ShardedTensor.flattened_range, which 0.16 refuses. convert-reshard rewrites them.
LOADED_BY_NO_CURRENT_MEGATRON = ("fully_sharded_model_space",)
_PARALLEL_DIMS = ("tp", "pp", "ep", "etp")


@dataclass
class OptimizerFit:
    """Whether a Megatron component's optimizer state loads at the run's parallelism.

    ``checkpoint``: the layout inferred from the checkpoint's chunks; ``run``: the one the run's
    config (``trainer_state.pt``) asks for. ``loadable``: None when either is unknown.
    ``convert``: the ``ckptctl convert-reshard`` command that rewrites it for the run's layout
    (``drop``: the same keeping only the weights), ``resume_path``: the step it writes."""

    component: str
    format: str | None
    checkpoint: dict
    run: dict | None
    loadable: bool | None
    reason: str
    convert: str | None = None
    drop: str | None = None
    resume_path: str | None = None
    overrides: list[str] = field(default_factory=list)  # Hydra overrides to launch with

    def to_dict(self) -> dict:
        return {**self.__dict__, "overrides": list(self.overrides)}


@dataclass
class Resolution:
    mode: str
    tree: str | None
    action: str  # what SkyRL would do: resume | scratch | fail
    path: str | None = None  # the step directory SkyRL would load
    step: int | None = None
    skyrl_error: str | None = None  # SkyRL's own reason when it would fail
    problems: list[str] = field(default_factory=list)  # ckptctl's checks on the chosen step
    warnings: list[str] = field(default_factory=list)
    loads: dict[str, str | None] = field(default_factory=dict)
    fallback_path: str | None = None
    fallback_step: int | None = None
    require_checkpoint: bool = False  # starting from scratch counts as a failure
    optimizer: list[OptimizerFit] = field(default_factory=list)  # Megatron components of the chosen step

    @property
    def resumable(self) -> bool:
        """True when training can start as planned: from scratch (unless a checkpoint is
        required), the chosen step, or the fallback."""
        if self.fallback_path:
            return True
        if self.action == SCRATCH:
            return not self.require_checkpoint
        return self.action == RESUME and not self.problems

    @property
    def reason(self) -> str | None:
        if self.resumable:
            return None
        if self.action == SCRATCH:
            return "nothing would be loaded: SkyRL would start from scratch (--require-checkpoint)"
        return self.skyrl_error or "; ".join(self.problems) or None

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "tree": self.tree,
            "skyrl_action": self.action,
            "resume_path": self.path,
            "step": self.step,
            "skyrl_error": self.skyrl_error,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "loads": dict(self.loads),
            "fallback": ({"resume_path": self.fallback_path, "step": self.fallback_step,
                          "overrides": [f"trainer.resume_mode=from_path",
                                        f"trainer.resume_path={self.fallback_path}"]}
                         if self.fallback_path else None),
            "require_checkpoint": self.require_checkpoint,
            "optimizer": [f.to_dict() for f in self.optimizer],
            "resumable": self.resumable,
            "reason": self.reason,
        }


def _usable_problems(step: Step) -> list[str]:
    problems = list(step.problems)
    if step.complete and not step.has_optimizer:
        problems.append("optimizer state is missing (model-only checkpoint): SkyRL's load would fail")
    return problems


def _loads(url: str, step: Step) -> dict[str, str | None]:
    out = {"trainer_state": posixpath.join(url, "trainer_state.pt"),
           "data": posixpath.join(url, "data.pt") if step.has_file("data.pt") else None}
    for name in MODEL_COMPONENTS:
        out[name] = posixpath.join(url, name) if name in step.components else None
    return out


def _deep_checked_problems(store: Store, step: Step) -> list[str]:
    """:func:`_usable_problems` after the deep check of the step's files (``store``: the tree)."""
    from ckptctl.formats.integrity import deep_check_step

    if not _usable_problems(step):
        deep_check_step(store, step)
    return _usable_problems(step)


def _pick_fallback(store: Store, tree: Tree, exclude: str | None) -> Step | None:
    """The newest step of the current run that is usable, deep check included (never an older
    run's higher step)."""
    for step in reversed(tree.current_run.steps):
        if step.name != exclude and not _usable_problems(step) and not _deep_checked_problems(store, step) \
                and not any(f.loadable is False for f in optimizer_fits(store, step, store.url_of(step.name))[0]):
            return step
    return None


def _check_step(res: Resolution, store: Store, step: Step) -> None:
    """SkyRL's own checks on the chosen directory, then ckptctl's (``store``: its parent)."""
    if not step.has_file("trainer_state.pt"):
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Trainer state file not found: {res.path}/trainer_state.pt"
        return
    res.loads = _loads(res.path, step)
    res.problems = _deep_checked_problems(store, step)
    res.warnings.extend(step.notes)
    _check_optimizer_fit(res, store, step)


# -- does the optimizer state load at the run's parallelism? ----------------------------------

def read_run_config(store: Store, rel: str) -> dict:
    """The training config saved in ``trainer_state.pt`` (a plain dict, or an OmegaConf one as
    SkyRL 0.3.1 pickles it), read WITHOUT torch (resolve-resume stays light)."""
    import io
    import zipfile

    from ckptctl.formats.safe_load import CorruptCheckpointError, load_plain_pickle, to_plain

    url = store.url_of(rel)
    data = store.read_bytes(rel)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if member is None:
                raise CorruptCheckpointError(f"cannot read {url}: no data.pkl in the archive")
            pickled = zf.read(member)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read {url}: not a torch.save zip archive ({exc})") from exc
    state = to_plain(load_plain_pickle(pickled, name=url))
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{url} holds no training config (a dict under 'config')")
    return config


def _dig(data, *keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def run_parallelism(config: dict, component: str) -> dict | None:
    """TP/PP/CP/EP/ETP and world size of ``component`` (policy/critic) from SkyRL's config:
    ``trainer.<component>.megatron_config.*_parallel_size`` and ``trainer.placement.
    <component>_num_nodes`` x ``<component>_num_gpus_per_node``. DP = world / (TP x PP x CP)
    (the distributed optimizer shards over DP x CP alike). None when the config has no
    Megatron settings for it."""
    mc = _dig(config, "trainer", component, "megatron_config")
    if not isinstance(mc, dict):
        return None

    def size(key, default):
        value = mc.get(key)
        return value if isinstance(value, int) and value > 0 else default

    tp = size("tensor_model_parallel_size", 1)
    out = {"tp": tp, "pp": size("pipeline_model_parallel_size", 1), "cp": size("context_parallel_size", 1),
           "ep": size("expert_model_parallel_size", 1), "etp": size("expert_tensor_parallel_size", tp)}
    nodes = _dig(config, "trainer", "placement", f"{component}_num_nodes")
    gpus = _dig(config, "trainer", "placement", f"{component}_num_gpus_per_node")
    world = nodes * gpus if isinstance(nodes, int) and isinstance(gpus, int) and nodes > 0 and gpus > 0 else None
    model_parallel = out["tp"] * out["pp"] * out["cp"]
    out["world_size"] = world
    out["dp"] = world // model_parallel if world and world % model_parallel == 0 else None
    out["optimizer_format"], out["optimizer_format_key"] = _run_optimizer_format(mc, component)
    return out


def _run_optimizer_format(mc: dict, component: str) -> tuple[str | None, str | None]:
    """The optimizer format the run saves AND loads with (megatron-core builds its load template
    for it), and the config key that says so: ``optimizer_checkpoint_sharding_type`` (a name) or
    ``dist_ckpt_optim_fully_reshardable`` (a flag; false = SkyRL's ``dp_reshardable``)."""
    key = f"trainer.{component}.megatron_config."
    named = mc.get("optimizer_checkpoint_sharding_type")
    if isinstance(named, str) and named:
        return named, key + "optimizer_checkpoint_sharding_type"
    flag = mc.get("dist_ckpt_optim_fully_reshardable")
    if isinstance(flag, bool):
        return ("fully_reshardable" if flag else "dp_reshardable"), key + "dist_ckpt_optim_fully_reshardable"
    return None, None


def _format_override(run: dict, fmt: str) -> str | None:
    """The Hydra override that makes the run load ``fmt``."""
    key = run.get("optimizer_format_key")
    if not key:
        return None
    if key.endswith("dist_ckpt_optim_fully_reshardable"):
        return f"{key}={'true' if fmt == 'fully_reshardable' else 'false'}" \
            if fmt in ("fully_reshardable", "dp_reshardable") else None
    return f"{key}={fmt}"


def layout_text(layout: dict, experts: bool) -> str:
    text = f"TP{layout.get('tp') or '?'}·PP{layout.get('pp') or '?'}"
    if experts:
        text += f"·EP{layout.get('ep') or '?'}·ETP{layout.get('etp') or '?'}"
    return text


def _optimizer_components(step: Step) -> list[Component]:
    return [c for c in step.components.values() if c.backend == MEGATRON and c.complete]


def optimizer_fits(store: Store, step: Step, step_url: str) -> tuple[list[OptimizerFit], list[str]]:
    """For each complete Megatron component of ``step`` (``store``: its parent): its optimizer
    format and layout (one read of its ``.metadata``) against the run's config (one read of
    ``trainer_state.pt``); and the warnings of what could not be told."""
    comps = _optimizer_components(step)
    fits: list[OptimizerFit] = []
    warnings: list[str] = []
    if not comps:
        return fits, warnings
    config, config_error = None, None
    try:
        config = read_run_config(store, posixpath.join(step.name, "trainer_state.pt"))
    except CkptctlError as exc:
        config_error = str(exc)
    for comp in comps:
        try:
            fit = optimizer_fit(store, comp, config, step_url)
        except CkptctlError as exc:
            warnings.append(f"{comp.name}: cannot tell whether its optimizer state loads at the run's "
                            f"parallelism: {exc}")
            continue
        if fit is None:
            continue
        fits.append(fit)
        if fit.loadable is None and fit.run is None and config_error:
            warnings.append(f"{comp.name}: the run's parallelism is unknown: {config_error}")
    return fits, warnings


def _check_optimizer_fit(res: Resolution, store: Store, step: Step) -> None:
    """:func:`optimizer_fits` of the chosen step: state that cannot load is a problem."""
    res.optimizer, warnings = optimizer_fits(store, step, res.path)
    res.warnings.extend(warnings)
    for fit in res.optimizer:
        if fit.loadable is False:
            res.problems.append(f"{fit.component}: {fit.reason}" + (
                f"; convert it: {fit.convert} (or add --drop-optimizer to keep the weights only)" if fit.convert
                else ""))


def optimizer_fit(store: Store, comp: Component, config: dict | None, step_url: str) -> OptimizerFit | None:
    """The :class:`OptimizerFit` of one Megatron component (``store``: what ``comp.path`` is
    relative to; ``step_url``: the step as the user named it). None without optimizer state."""
    from ckptctl.formats.megatron import MegatronReader

    reader = MegatronReader(store.child(comp.path) if comp.path else store, nesting=comp.nesting)
    summary = reader.summary(common=False, check_files=False)  # key names only: no torch, no tensor read
    opt = summary.get("optimizer") or {}
    fmt = opt.get("format")
    if not fmt:
        return None
    par = summary.get("parallel") or {}
    experts = bool(par.get("num_experts"))
    checkpoint = {k: par.get(k) for k in (*_PARALLEL_DIMS, "dp")}
    if not experts:
        checkpoint["ep"] = checkpoint["etp"] = None
    checkpoint["layout"] = par.get("layout")
    run = run_parallelism(config, comp.name) if config is not None else None
    fit = OptimizerFit(component=comp.name, format=fmt, checkpoint=checkpoint, run=run, loadable=None, reason="")
    formats = {c.get("format") for c in opt.get("chains") or ()} | {fmt}
    legacy = sorted(formats & set(LOADED_BY_NO_CURRENT_MEGATRON))
    if legacy:
        fit.loadable = False
        fit.reason = (f"{', '.join(legacy)} optimizer state (megatron-core 0.13 and older) cannot be loaded by "
                      "megatron-core 0.16 at any layout (ShardedTensor.flattened_range is not supported)")
        target = run if run is not None and all(run.get(d) for d in ("tp", "pp")) else checkpoint
        if all(target.get(d) for d in ("tp", "pp")) and (not experts or all(target.get(d) for d in ("ep", "etp"))):
            _convert_commands(fit, comp, step_url, target, experts)
            fit.overrides = _resume_overrides(fit, run or {})
        return fit
    bound = sorted({c["format"] for c in opt.get("chains") or () if c.get("format") in MODEL_PARALLEL_BOUND}
                   or ({fmt} & set(MODEL_PARALLEL_BOUND)))
    if run is not None and run.get("optimizer_format") and run["optimizer_format"] != fmt:
        # megatron-core loads through a template of the run's own format: other keys are missing
        fit.loadable = False
        fit.reason = (f"the run's config loads optimizer state as {run['optimizer_format']} "
                      f"({run['optimizer_format_key']}) but this checkpoint holds {fmt}")
        override = _format_override(run, fmt)
        if override and (not bound or all(checkpoint.get(d) == run.get(d) for d in _PARALLEL_DIMS
                                          if checkpoint.get(d) is not None)):
            fit.overrides = [override]
            fit.reason += f": launch with {override}"
            return fit
        if not bound:
            return fit
    if not bound:
        fit.loadable = True
        fit.reason = f"{fmt} optimizer state loads at any TP/PP/EP/DP"
        return fit
    dims = ("tp", "pp", "ep", "etp") if experts else ("tp", "pp")
    written = layout_text(checkpoint, experts)
    if run is None:
        fit.reason = (f"{', '.join(bound)} optimizer state (written at {written}) loads only at that TP/PP"
                      + ("/EP" if experts else "") + "; the run's parallelism is unknown (no "
                      f"trainer.{comp.name}.megatron_config in trainer_state.pt)")
        return fit
    if any(checkpoint.get(d) is None for d in dims):
        if fit.loadable is None:  # (a format mismatch stays the answer)
            fit.reason = f"cannot tell the TP/PP{'/EP' if experts else ''} this checkpoint was written at"
        return fit
    wanted = layout_text(run, experts)
    if all(checkpoint[d] == run[d] for d in dims):
        if fit.loadable is False:  # the run's format differs and no override can say this one
            return fit
        fit.loadable = True
        fit.reason = f"{', '.join(bound)} optimizer state written at {written}, the run's layout"
        if run.get("dp") and checkpoint.get("dp") and run["dp"] != checkpoint["dp"]:
            fit.reason += f" (megatron-core re-splits it from DP{checkpoint['dp']} to DP{run['dp']})"
        return fit
    fit.loadable = False
    fit.reason = (f"{', '.join(bound)} optimizer state written at {written} cannot be loaded at the run's "
                  f"{wanted} (trainer_state.pt): megatron-core reloads it only at the same "
                  f"TP/PP{'/EP' if experts else ''}")
    _convert_commands(fit, comp, step_url, run, experts)
    fit.overrides = _resume_overrides(fit, run)
    return fit


def _resume_overrides(fit: OptimizerFit, run: dict) -> list[str]:
    """The overrides that resume from the converted step: convert-reshard writes the state as
    fully_reshardable, so the run must load that format."""
    override = _format_override(run, "fully_reshardable")
    return ["trainer.resume_mode=from_path", f"trainer.resume_path={fit.resume_path}"] + (
        [override] if override and run.get("optimizer_format") != "fully_reshardable" else [])


def _convert_commands(fit: OptimizerFit, comp: Component, step_url: str, run: dict, experts: bool) -> None:
    """``convert-reshard`` of the component for the run's layout, into a sibling tree (the step
    keeps its ``global_step_N`` name, as SkyRL's from_path resume requires)."""
    import shlex

    step_url = step_url.rstrip("/")
    tree, name = posixpath.split(step_url)
    tree = tree.rstrip("/")
    suffix = f"tp{run['tp']}pp{run['pp']}" + (f"ep{run['ep']}etp{run['etp']}" if experts else "")
    if not tree or tree.endswith(":") or ("://" in tree and "/" not in tree.split("://", 1)[1]):
        target_step = posixpath.join(tree + "/" if tree.endswith(":") else tree, f"resharded-{suffix}", name)
    else:  # a sibling of the tree: /ckpts-tp1pp2/global_step_N
        target_step = posixpath.join(f"{tree}-{suffix}", name)
    args = ["ckptctl", "convert-reshard", posixpath.join(step_url, comp.name), "--out",
            posixpath.join(target_step, comp.name), "--tp", str(run["tp"]), "--pp", str(run["pp"])]
    if run.get("dp"):
        args += ["--dp", str(run["dp"])]
    if experts:
        args += ["--ep", str(run["ep"]), "--etp", str(run["etp"])]
    fit.convert = shlex.join(args)
    fit.drop = shlex.join(args + ["--drop-optimizer"])
    fit.resume_path = target_step


def skyrl_step_number(name: str) -> int:
    """SkyRL's ``extract_step_from_path`` on a directory name: ``int()`` of what follows
    ``global_step_`` (raising ValueError as SkyRL does), -1 when the name does not start with it."""
    if name.startswith(STEP_PREFIX):
        return int(name.split(STEP_PREFIX)[1])
    return -1


def _highest_listed(names: list[str]) -> tuple[int | None, str | None]:
    """(highest step among ``names``, None) the way SkyRL parses them, or (None, its error)."""
    values = []
    for name in names:
        try:
            values.append(skyrl_step_number(name))
        except ValueError as exc:
            return None, f"ValueError: {exc} (SkyRL parses every {STEP_PREFIX}* name; here {name})"
    return (max(values) if values else None), None


def _inconsistent(pointer: int, highest: int, interval: int) -> str:
    return (f"ValueError: Inconsistent checkpoint folder: {POINTER_FILE} points to {pointer}, but "
            f"{canonical_step_name(highest)} exists ({highest - pointer} > ckpt_interval {interval}); "
            "delete or move checkpoints from older runs")


_SCHEME_TYPO = re.compile(r"^(s3|s3a|gs|gcs):/(?!/)", re.IGNORECASE)


def _missing_path_warning(typed: str) -> str:
    text = f"{typed} does not exist: SkyRL starts from scratch and nothing is loaded"
    match = _SCHEME_TYPO.match(typed)
    if match:
        text += f" (did you mean {match.group(1)}://{typed[match.end():]}?)"
    return text


def _resolve_latest(res: Resolution, store: Store, ckpt_interval: int | None, typed: str) -> Tree | None:
    try:
        tree = scan_tree(store)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        res.action = SCRATCH
        res.warnings.append(_missing_path_warning(typed))
        return None
    except NotACheckpointError:
        res.action = SCRATCH
        res.warnings.append(f"{typed} holds no checkpoints: SkyRL starts from scratch")
        return None
    res.tree = tree.url
    res.warnings.extend(tree.current_run.warnings())
    if not tree.pointer.present:
        res.action = SCRATCH
        if tree.steps:
            res.warnings.append(f"{len(tree.steps)} step directories exist but there is no {POINTER_FILE}: "
                                "SkyRL starts from scratch and ignores them")
        return tree
    try:
        pointer = int(tree.pointer.raw)  # SkyRL: int(f.read().strip())
    except ValueError as exc:
        res.action = FAIL
        res.skyrl_error = f"ValueError: {exc} (in {POINTER_FILE})"
        return tree
    name = canonical_step_name(pointer)
    res.step = pointer
    res.path = store.url_of(name)
    # SkyRL lists the root (ls) and keeps the global_step_* entries that are directories.
    entries = dict(store.list_dir())
    dirs = [n for n, is_dir in entries.items() if n.startswith(STEP_PREFIX) and is_dir]
    highest, error = _highest_listed(dirs)
    if error is None and highest is not None and ckpt_interval is not None and highest - pointer > ckpt_interval:
        error = _inconsistent(pointer, highest, ckpt_interval)
    files = [n for n, is_dir in entries.items() if n.startswith(STEP_PREFIX) and not is_dir]
    if error is None and files:
        # Older releases list with os.listdir: files too.
        old_highest, old_error = _highest_listed(dirs + files)
        if old_error is None and old_highest is not None and ckpt_interval is not None \
                and old_highest - pointer > ckpt_interval:
            old_error = _inconsistent(pointer, old_highest, ckpt_interval)
        if old_error is not None:
            error = (f"{old_error} -- older SkyRL releases count the FILE{'S' if len(files) > 1 else ''} "
                     f"{', '.join(files)} (newer ones skip files); remove or rename it")
        else:
            res.warnings.append(f"files named like steps ({', '.join(files)}): SkyRL skips them (older releases "
                                "count them as steps)")
    if error is not None:
        res.action = FAIL
        res.skyrl_error = error
        return tree
    if highest is not None and highest > pointer and ckpt_interval is None:
        res.warnings.append(f"highest step directory {highest} is above the pointer {pointer}: SkyRL fails "
                            f"with 'Inconsistent checkpoint folder' if the gap exceeds trainer.ckpt_interval "
                            f"(pass --ckpt-interval to check)")
    # SkyRL's exists(): a listed entry that is no directory may be a file, or a dangling link.
    if name not in entries or (not entries[name] and not store.exists(name)):
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Checkpoint path not found: {res.path}"
        other = tree.step(pointer)
        if other is not None:
            res.warnings.append(f"{other.name} holds step {pointer}, but SkyRL opens {name} (it builds the name "
                                f"from the number): rename {other.name} to {name}")
        return tree
    step = tree.pointer_target
    if step is None:  # listed by SkyRL, not by the tree walk: a symlink, an empty directory or a file
        step = _scan_listed_step(store, name, pointer, is_dir=entries[name])
    res.action = RESUME
    _check_step(res, store, step)
    return tree


def _scan_listed_step(store: Store, name: str, number: int, *, is_dir: bool) -> Step:
    """A step directory the tree's walk did not enter (a symlink SkyRL follows, or an empty
    directory), classified from a walk of its own."""
    files = []
    if is_dir:
        try:
            files = store.child(name).walk()
        except NotFoundError:
            files = []  # an empty directory (a marker object on S3/GCS)
    return classify_step(store, name, number, files)


def _resolve_from_path(res: Resolution, resume_path: str | None, endpoint_url: str | None) -> Store | None:
    """Resolve ``from_path``; returns the step's parent store (where a fallback is looked for)."""
    if not resume_path:
        res.action = FAIL
        res.skyrl_error = "ValueError: `trainer.resume_path` must be specified when resume_mode is 'from_path'"
        return None
    path = resume_path.rstrip("/")
    base = posixpath.basename(path)
    res.path = path
    if STEP_PREFIX not in base:
        res.action = FAIL
        res.skyrl_error = (f"ValueError: `trainer.resume_path` must point to a directory whose name starts "
                           f"with {STEP_PREFIX}, got: {path}")
        return None
    if "://" in path:
        res.warnings.append("SkyRL releases up to 0.3.1 pass resume_path through pathlib, which breaks "
                            "s3:// and gs:// URIs (s3://b becomes s3:/b); newer releases read them directly")
    store = open_store(path, endpoint_url=endpoint_url)
    try:
        step = scan_step(store)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Checkpoint path not found: {path}"
        return None
    res.path = store.url
    if not base.startswith(STEP_PREFIX):
        res.action = FAIL
        res.skyrl_error = f"ValueError: Checkpoint path {path} is not a valid checkpoint path"
        return None
    try:
        number = skyrl_step_number(base)
    except ValueError as exc:
        res.action = FAIL
        res.skyrl_error = f"ValueError: {exc}"
        return None
    step.step = number
    res.action = RESUME
    res.step = number
    _check_step(res, store.parent(), step)
    return store.parent()


def resolve_resume(url: str | None, *, mode: str = "latest", resume_path: str | None = None,
                   ckpt_interval: int | None = None, fallback: bool = False, require_checkpoint: bool = False,
                   endpoint_url: str | None = None) -> Resolution:
    """Tell what SkyRL would load for ``trainer.resume_mode=mode`` and whether it is usable.

    ``require_checkpoint``: starting from scratch (nothing to load) is not resumable."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if ckpt_interval is not None and ckpt_interval <= 0:
        raise UsageError("--ckpt-interval must be 1 or more")
    res = Resolution(mode=mode, tree=url, action=SCRATCH, require_checkpoint=require_checkpoint)
    if mode == "none":
        return res
    if mode == "latest":
        if not url:
            raise UsageError("--mode latest needs the checkpoint tree PATH (trainer.ckpt_path)")
        store = open_store(url, endpoint_url=endpoint_url)
        tree = _resolve_latest(res, store, ckpt_interval, url)
    else:
        store = _resolve_from_path(res, resume_path, endpoint_url)
        tree = None
        if fallback and not res.resumable and store is not None:
            try:
                tree = scan_tree(store)
            except (NotFoundError, NotACheckpointError):
                tree = None
    if fallback and not res.resumable and tree is not None:
        chosen = posixpath.basename(res.path) if res.action == RESUME and res.path else None
        choice = _pick_fallback(store, tree, chosen)
        if choice is not None:
            res.fallback_step = choice.step
            res.fallback_path = store.url_of(choice.name)
            res.warnings.append(f"SkyRL itself would not load this; resume instead from {res.fallback_path} "
                                f"with trainer.resume_mode=from_path")
    return res
