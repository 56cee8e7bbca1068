"""ckptctl never runs code from a checkpoint: a corpus of malicious ``.pt`` files.

Every file below would run its payload under ``torch.load(weights_only=False)`` (SkyRL's way);
the first test proves that, so the corpus is real. Through ckptctl -- ``load_pt`` (path,
file object, bytes) and torchzip's metadata reading -- each is refused with
UnsafeCheckpointError naming the offending global, and nothing runs (no marker file, no
environment change). Corrupt files raise CorruptCheckpointError naming the file.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptctl.formats import safe_load  # noqa: E402
from ckptctl.formats.safe_load import (  # noqa: E402
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_pt,
    stand_in_getattr,
    to_plain,
)
from ckptctl.formats.torchzip import TorchZipFile  # noqa: E402
from ckptctl.storage import Store  # noqa: E402


class Payload:
    """Unpickles to ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _corpus(marker: Path) -> dict[str, tuple[object, tuple[str, ...]]]:
    """name -> (object to torch.save, globals an error may name)."""
    touch = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')"
    weights = {"w": torch.randn(4, 4)}
    return {
        "os_system": ({**weights, "x": Payload(os.system, f"touch {marker}")}, ("posix.system", "os.system")),
        "builtins_eval": (Payload(eval, touch.replace("import pathlib; ", "__import__('pathlib').")),
                          ("builtins.eval",)),
        "builtins_exec": ({"model": weights, "extra": Payload(exec, touch)}, ("builtins.exec",)),
        "open_write": (Payload(builtins.open, str(marker), "w"), ("io.open", "builtins.open", "_io.open")),
        "io_fileio": (Payload(io.FileIO, str(marker), "w"), ("io.FileIO", "_io.FileIO")),
        "subprocess_popen": (Payload(subprocess.Popen, ["touch", str(marker)]), ("subprocess.Popen",)),
        "env_change": (Payload(os.putenv, "CKPTCTL_PWNED", "1"), ("posix.putenv", "os.putenv")),
        # nested deep inside an optimizer-like state, next to real tensors
        "nested_optimizer": ({"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                                            "exp_avg_sq": {"inner": [Payload(os.system, f"touch {marker}")]}}},
                              "param_groups": [{"lr": 1e-3, "params": [0]}]}, ("posix.system", "os.system")),
    }


@pytest.fixture
def corpus(tmp_path):
    marker = tmp_path / "marker"
    out = {}
    for name, (obj, culprits) in _corpus(marker).items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        out[name] = (path, culprits)
    return marker, out


def _no_side_effects(marker: Path) -> None:
    assert not marker.exists(), "a payload ran"
    assert "CKPTCTL_PWNED" not in os.environ


def test_corpus_is_really_malicious(corpus, tmp_path):
    """Sanity: full unpickling (what SkyRL does) runs the payloads -- in a child process."""
    marker, files = corpus
    script = f"import torch; torch.load({str(files['builtins_exec'][0])!r}, weights_only=False)"
    subprocess.run([os.sys.executable, "-c", script], check=True, capture_output=True, timeout=60)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name", list(_corpus(Path("x"))))
@pytest.mark.parametrize("how", ["path", "fileobj", "bytes", "mmap"])
def test_load_pt_refuses(corpus, name, how):
    marker, files = corpus
    path, culprits = files[name]
    source = {"path": str(path), "mmap": str(path), "fileobj": open(path, "rb"), "bytes": path.read_bytes()}[how]
    try:
        with pytest.raises(UnsafeCheckpointError) as info:
            load_pt(source, name=path.name, mmap=how == "mmap")
    finally:
        if hasattr(source, "close"):
            source.close()
    message = str(info.value)
    assert path.name in message and any(c in message for c in culprits), message
    assert "--allow-global" not in message  # dangerous names get no "trust it" hint
    _no_side_effects(marker)


@pytest.mark.parametrize("name", list(_corpus(Path("x"))))
def test_torchzip_metadata_refuses(corpus, name):
    marker, files = corpus
    path, culprits = files[name]
    zf = TorchZipFile(Store(str(path.parent)), path.name)
    with pytest.raises(UnsafeCheckpointError) as info:
        zf.metadata()
    message = str(info.value)
    assert path.name in message and any(c in message for c in culprits), message
    _no_side_effects(marker)


def test_allow_global_cannot_run_code(corpus):
    """Even a dangerous name passed as --allow-global only becomes a stand-in: kept as data.
    (torch blocks os/posix/sys/nt outright, so those cannot even become stand-ins.)"""
    marker, files = corpus
    for name, allow in (("subprocess_popen", "commands.Popen"), ("builtins_exec", "builtins.exec")):
        path, _ = files[name]
        for obj in (load_pt(str(path), extra_stand_ins=[allow]),
                    TorchZipFile(Store(str(path.parent)), path.name, extra_stand_ins=[allow]).metadata()):
            payload = obj if isinstance(obj, safe_load.PickledObject) else obj["extra"]
            assert isinstance(payload, safe_load.PickledObject) and payload.qualname == allow
    _no_side_effects(marker)


def test_process_wide_registrations_do_not_widen_the_allowlist(corpus):
    """Other code may register globals with torch process-wide (``import megatron.core`` does);
    ckptctl's loads still accept only ckptctl's allowlist, and the registrations survive."""
    marker, files = corpus
    path, _ = files["subprocess_popen"]
    foreign = [(subprocess.Popen, "commands.Popen"), (subprocess.Popen, "subprocess.Popen")]
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(foreign)
    try:
        with pytest.raises(UnsafeCheckpointError, match=r"commands\.Popen"):
            load_pt(str(path))
        with pytest.raises(UnsafeCheckpointError, match=r"commands\.Popen"):
            TorchZipFile(Store(str(path.parent)), path.name).metadata()
        assert set(foreign) <= set(torch.serialization.get_safe_globals())  # restored
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)
    _no_side_effects(marker)


class Harmless:
    """A custom class whose construction would have side effects if it ran."""

    created: list = []

    def __init__(self, value):
        Harmless.created.append(value)
        self.value = value

    def __setstate__(self, state):
        Harmless.created.append(state)
        self.__dict__.update(state)


def test_unknown_class_is_refused_then_kept_as_data(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"cfg": Harmless(3)}, path)
    Harmless.created.clear()
    qualname = f"{Harmless.__module__}.Harmless"
    with pytest.raises(UnsafeCheckpointError, match=f"{qualname}.*--allow-global {qualname}"):
        load_pt(str(path))
    obj = load_pt(str(path), extra_stand_ins=[qualname])
    assert to_plain(obj["cfg"]) == {"__class__": qualname, "value": 3}
    assert Harmless.created == []  # neither __init__ nor __setstate__ ran


def _handmade(tmp_path: Path, name: str, pkl: bytes) -> Path:
    """A torch.save archive whose data.pkl is ``pkl`` (a hand-written pickle)."""
    src = tmp_path / "src.pt"
    torch.save({"a": 1}, src)
    dst = tmp_path / name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else zin.read(info))
    return dst


def test_getattr_only_on_stand_ins(tmp_path):
    """builtins.getattr is allowed only as stand_in_getattr: no way to reach a real attribute."""
    # getattr(torch.Tensor, "__reduce_ex__")
    on_real = _handmade(tmp_path, "getattr_real.pt",
                        b"\x80\x02c__builtin__\ngetattr\nctorch\nTensor\nX\x0d\x00\x00\x00__reduce_ex__\x86R.")
    # getattr(<stand-in DictConfig>, "__init__"): not itself on the allowlist
    on_stand_in = _handmade(tmp_path, "getattr_stand_in.pt",
                            b"\x80\x02c__builtin__\ngetattr\ncomegaconf.dictconfig\nDictConfig\n"
                            b"X\x08\x00\x00\x00__init__\x86R.")
    for path, culprit in ((on_real, "builtins.getattr"), (on_stand_in, "omegaconf.dictconfig.DictConfig.__init__")):
        with pytest.raises(UnsafeCheckpointError, match=culprit.replace(".", r"\.")):
            load_pt(str(path))
        with pytest.raises(UnsafeCheckpointError, match=culprit.replace(".", r"\.")):
            TorchZipFile(Store(str(tmp_path)), path.name).metadata()
    with pytest.raises(pickle.UnpicklingError):
        stand_in_getattr(os, "system")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_newer_pickle_protocol_runs_nothing(tmp_path):
    """Protocol 4 (STACK_GLOBAL) is outside torch's weights-only unpickler: refused, nothing runs."""
    marker = tmp_path / "marker"
    path = tmp_path / "p4.pt"
    torch.save(Payload(os.system, f"touch {marker}"), path, pickle_protocol=4)
    for load in (lambda: load_pt(str(path)), lambda: TorchZipFile(Store(str(tmp_path)), path.name).metadata()):
        with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match="p4.pt"):
            load()
    _no_side_effects(marker)


def test_legacy_format_malicious(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "old.pt"
    torch.save({"x": Payload(os.system, f"touch {marker}")}, path, _use_new_zipfile_serialization=False)
    for load in (lambda: load_pt(str(path)), lambda: TorchZipFile(Store(str(tmp_path)), path.name).metadata()):
        with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
            load()
    _no_side_effects(marker)


# ----------------------------------------------------------------------------- corrupt files

@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "optim_world_size_2_rank_1.pt"
    torch.save({"state": {0: {"exp_avg": torch.randn(100, 10)}}, "param_groups": [{"params": [0]}]}, path)
    return path


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -22, -1])
def test_truncated_is_corrupt(good_file, cut):
    raw = good_file.read_bytes()
    good_file.write_bytes(raw[:cut] if isinstance(cut, int) else raw[:int(len(raw) * cut)])
    with pytest.raises(CorruptCheckpointError, match=good_file.name):
        load_pt(str(good_file))
    with pytest.raises(CorruptCheckpointError, match=good_file.name):
        TorchZipFile(Store(str(good_file.parent)), good_file.name).metadata()


def test_not_a_checkpoint_is_corrupt(tmp_path):
    path = tmp_path / "model_world_size_1_rank_0.pt"
    path.write_text("this is not a checkpoint\n" * 100)
    with pytest.raises(CorruptCheckpointError, match=path.name):
        load_pt(str(path))
    with pytest.raises(CorruptCheckpointError, match=path.name):
        TorchZipFile(Store(str(tmp_path)), path.name).metadata()


# ----------------------------------------------------------------------------- stand-ins

def test_sharded_tensor_kept_as_data(fsdp_ckpts):
    """Legacy ShardedTensor: unpicklable for real without a process group; kept as data here."""
    comp = fsdp_ckpts["fsdp1_sharded"]
    sd = load_pt(str(comp.file("model", 1)))
    st = sd["model.embed_tokens.weight"]
    assert isinstance(st, safe_load.TensorStandIn) and tuple(st.shape) == (1000, 64)
    (shard,) = st.state[0]
    assert tuple(shard.fields["tensor"].shape) == (334, 64)
    plain = to_plain(st.state[1])
    assert [s["shard_offsets"] for s in plain["shards_metadata"]] == [[0, 0], [334, 0], [668, 0]]
    assert [s["placement"]["_rank"] for s in plain["shards_metadata"]] == [0, 1, 2]
    with pytest.raises(TypeError):  # no data behind it
        torch.add(st, 1)


def test_concurrent_loads(fsdp_ckpts):
    """torch's allowlist is process-global: concurrent loads must not see each other's changes."""
    comp = fsdp_ckpts["w2"]
    paths = [str(comp.file(k, r)) for k in ("extra_state", "model") for r in range(2)] * 3
    errors = []

    def work(p):
        try:
            load_pt(p) if "extra" in p else TorchZipFile(Store(os.path.dirname(p)), os.path.basename(p)).metadata()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_allow_global_does_not_replace_the_dtensor_stand_ins(fsdp_ckpts):
    """--allow-global naming a DTensor-family class keeps ckptctl's stand-ins (a generic
    kept-as-data class in their place would lose the DTensor's shape and placements). torch keeps
    its allowlist in a set: of two entries for one name, either could win, so there must be one."""
    names = [q for _, q in safe_load._safe_globals(safe_load.DTENSOR_STAND_INS)]
    assert [names.count(q) for q in safe_load.DTENSOR_STAND_INS] == [1] * len(safe_load.DTENSOR_STAND_INS)
    path = fsdp_ckpts["w3_tied"].file("model", 0)
    sd = safe_load.load_pt(str(path), extra_stand_ins=safe_load.DTENSOR_STAND_INS)
    plain = safe_load.load_pt(str(path))
    assert list(sd) == list(plain)
    for name, value in plain.items():
        if safe_load.is_dtensor(value):
            got = sd[name]
            assert safe_load.is_dtensor(got) and got.shape == value.shape and got.placements == value.placements
            assert [safe_load.placement_kind(p) for p in got.placements] == ["Shard"]
            assert torch.equal(got.to_local(), value.to_local())
