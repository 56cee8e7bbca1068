"""The streaming HF safetensors writer (ckptctl.formats.hf_writer) on local disk, S3 and GCS.

The reference is transformers itself: a tiny LlamaForCausalLM is saved with
``save_pretrained(max_shard_size=...)`` and the writer's output must carry the same file names,
a byte-identical ``model.safetensors.index.json`` and the same tensors per shard; it must load
back with ``AutoModelForCausalLM.from_pretrained`` into an identical state dict. Checks read
the stores through independent clients (``storage_servers.Backend``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file

from ckptctl.errors import UsageError
from ckptctl.formats import hf_writer
from ckptctl.formats.hf_writer import (INCOMPLETE_MARKER, TMP_INFIX, HfModelWriter, TensorSpec, plan_shards,
                                       specs_from_state_dict, verify_export)
from realckpt.tiny_models import make_model, make_tokenizer

SHARDED = 40_000  # fp32: embed_tokens / lm_head (65,536 B) get shards of their own
WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- references written by transformers --------------------------------------------------------
class Reference:
    def __init__(self, model, directory: str):
        self.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.dir = directory
        self.files = sorted(os.listdir(directory))
        with open(os.path.join(directory, "config.json"), "rb") as f:
            self.config = json.loads(f.read())
        self.extras = {}
        for name in self.files:
            if name not in WEIGHT_FILES and not name.endswith(".safetensors"):
                with open(os.path.join(directory, name), "rb") as f:
                    self.extras[name] = f.read()

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    @property
    def specs(self) -> list[TensorSpec]:
        return specs_from_state_dict(self.state_dict)

    @property
    def expected(self) -> dict:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state_dict.items()}


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, tuple[Reference, int | str]]:
    tokenizer = make_tokenizer()
    fp32 = make_model("llama", seed=0, vocab=256)
    bf16 = make_model("llama", seed=1, vocab=256).to(torch.bfloat16)
    out = {}
    for variant, model, size in (("fp32-sharded", fp32, SHARDED), ("bf16-sharded", bf16, 20_000),
                                 ("fp32-single", fp32, "50GB")):
        directory = str(tmp_path_factory.mktemp(variant))
        model.save_pretrained(directory, max_shard_size=size)
        tokenizer.save_pretrained(directory)
        out[variant] = (Reference(model, directory), size)
    return out


# -- helpers ------------------------------------------------------------------------------------
def export(url: str, ref: Reference, max_shard_size, **kwargs):
    with HfModelWriter(url, ref.specs, max_shard_size=max_shard_size, **kwargs) as writer:
        for name, tensor in ref.state_dict.items():
            writer.add(name, tensor)
        return writer.finish(ref.config, ref.extras)


def fetch(backend, url: str, directory: str) -> str:
    """A local copy of the export (cloud: downloaded with the independent client)."""
    if backend.kind == "local":
        return url
    for rel in backend.list_files(url):
        path = os.path.join(directory, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(backend.get(backend.join(url, rel)))
    return directory


def siblings(url: str) -> list[str]:
    parent, name = os.path.split(url)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}{TMP_INFIX}"))


def leftovers(backend, url: str) -> list[str]:
    """What a failed run left: local temp siblings, or objects under the cloud prefix."""
    if backend.kind == "local":
        return siblings(url) + (os.listdir(url) if os.path.isdir(url) else [])
    return backend.list_files(url)


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# -- the plan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes,limit", [
    ([6, 6, 2, 6, 2, 2], 10),  # huggingface_hub's own docstring example
    ([3, 12, 3, 3, 3, 15, 1], 10),  # oversized tensors go alone, before the shard being filled
    ([4, 4], 100),  # one shard: model.safetensors
    ([10, 10, 10], 10),
])
def test_plan_matches_huggingface_hub_split(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    state_dict = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=limit)
    plan = plan_shards(specs_from_state_dict(state_dict), limit)
    assert {f: [s.name for s in shard] for f, shard in zip(plan.files, plan.shards)} == split.filename_to_tensors
    assert list(split.filename_to_tensors) == plan.files
    assert plan.total_size == split.metadata["total_size"]


# -- round trip against save_pretrained ---------------------------------------------------------
@pytest.mark.parametrize("variant", ["fp32-sharded", "bf16-sharded", "fp32-single"])
def test_roundtrip_matches_save_pretrained(store_backend, refs, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, size = refs[variant]
    url = store_backend.new_root()
    summary = export(url, ref, size)

    # Same files as save_pretrained + tokenizer.save_pretrained, byte-identical index.
    assert store_backend.list_files(url) == ref.files
    sharded = "model.safetensors.index.json" in ref.files
    assert (summary.shard_count > 1) == sharded
    assert summary.shard_files == sorted(f for f in ref.files if f.endswith(".safetensors"))
    if sharded:
        ours = store_backend.get(store_backend.join(url, "model.safetensors.index.json"))
        assert ours == ref.read("model.safetensors.index.json")
    assert summary.files[-1] == "config.json"
    assert summary.tensor_count == len(ref.state_dict)
    assert summary.total_size == sum(t.numel() * t.element_size() for t in ref.state_dict.values())
    dtype = str(next(iter(ref.state_dict.values())).dtype).split(".")[-1]
    assert summary.dtype_counts == {dtype: len(ref.state_dict)}

    local = fetch(store_backend, url, str(tmp_path / "download"))
    # Each shard holds the same tensors as transformers' shard of the same name.
    for name in summary.shard_files:
        ours, theirs = load_file(os.path.join(local, name)), load_file(os.path.join(ref.dir, name))
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)

    # transformers loads it into the same weights.
    model = AutoModelForCausalLM.from_pretrained(local)
    loaded = model.state_dict()
    assert set(loaded) == set(ref.state_dict)
    for key, tensor in ref.state_dict.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key

    assert verify_export(url) == []
    assert verify_export(url, ref.expected) == []


# -- safety ---------------------------------------------------------------------------------------
def test_refuses_non_empty_destination(store_backend, refs):
    ref, size = refs["fp32-sharded"]
    url = store_backend.new_root()
    store_backend.put(store_backend.join(url, "notes.txt"), b"keep me")
    with pytest.raises(UsageError, match="not empty") as info:
        HfModelWriter(url, ref.specs, max_shard_size=size)
    assert info.value.exit_code == 2
    assert store_backend.list_files(url) == ["notes.txt"]
    assert store_backend.get(store_backend.join(url, "notes.txt")) == b"keep me"


def test_overwrite_replaces_previous_export(store_backend, refs, monkeypatch):
    swaps = []
    real = hf_writer._rename_exchange
    monkeypatch.setattr(hf_writer, "_rename_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    check_overwrite(store_backend, refs)
    assert swaps == ([True] if store_backend.kind == "local" else [])  # one atomic swap (ext4/tmpfs)


def test_local_overwrite_without_rename_exchange(make_backend, refs, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unsupported: two renames."""
    monkeypatch.setattr(hf_writer, "_USE_EXCHANGE", False)
    check_overwrite(make_backend("local"), refs)


def check_overwrite(store_backend, refs):
    sharded, size = refs["fp32-sharded"]
    single, _ = refs["fp32-single"]
    url = store_backend.new_root()
    export(url, sharded, size)
    # (a foreign file beside an export is refused: tests/test_overwrite.py)
    summary = export(url, single, "50GB", overwrite=True)
    assert summary.replaced.startswith("an HF model directory")
    assert store_backend.list_files(url) == single.files  # old shards and index are gone
    assert verify_export(url, single.expected) == []
    if store_backend.kind == "local":
        assert siblings(url) == []


@pytest.mark.parametrize("when", ["after-some-tensors", "before-any-tensor", "exception-in-with"])
def test_abort_leaves_nothing(store_backend, refs, when):
    ref, size = refs["fp32-sharded"]
    url = store_backend.new_root()
    names = list(ref.state_dict)
    if when == "exception-in-with":
        with pytest.raises(RuntimeError, match="source failed"):
            with HfModelWriter(url, ref.specs, max_shard_size=size) as writer:
                for name in names[: len(names) // 2]:
                    writer.add(name, ref.state_dict[name])
                raise RuntimeError("source failed")
    else:
        writer = HfModelWriter(url, ref.specs, max_shard_size=size)
        if when == "after-some-tensors":
            for name in names[: len(names) // 2]:
                writer.add(name, ref.state_dict[name])
            assert leftovers(store_backend, url)  # something was written ...
        writer.abort()
    assert leftovers(store_backend, url) == []  # ... and is gone
    assert not os.path.exists(url) if store_backend.kind == "local" else True
    export(url, ref, size)  # the destination is usable
    assert verify_export(url, ref.expected) == []


def test_crash_without_abort_then_rerun(store_backend, refs):
    """An exception in the middle of the adds, never aborted (the writer is just dropped)."""
    ref, size = refs["fp32-sharded"]
    url = store_backend.new_root()
    names = list(ref.state_dict)

    def crashing_export():
        writer = HfModelWriter(url, ref.specs, max_shard_size=size)
        for i, name in enumerate(names):
            if i == 2 * len(names) // 3:
                raise RuntimeError("simulated crash")
            writer.add(name, ref.state_dict[name])

    with pytest.raises(RuntimeError):
        crashing_export()
    gc.collect()
    if store_backend.kind == "local":
        assert not os.path.exists(url)
        assert siblings(url) == []  # the dropped writer took its temp directory with it
    else:
        left = store_backend.list_files(url)
        assert "config.json" not in left and INCOMPLETE_MARKER in left
        assert any(n.endswith(".safetensors") for n in left)  # completed shards stay
    summary = export(url, ref, size)  # the rerun needs no overwrite
    assert summary.replaced == (None if store_backend.kind == "local" else "interrupted")
    assert store_backend.list_files(url) == ref.files
    assert verify_export(url, ref.expected) == []


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    from ckptctl.formats.hf_writer import HfModelWriter, TensorSpec
    torch.manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(8)}  # 16 KiB each
    writer = HfModelWriter(sys.argv[1], [TensorSpec(k, (64, 64), "float32") for k in tensors],
                           max_shard_size=40_000)
    for i, (name, tensor) in enumerate(tensors.items()):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        writer.add(name, tensor)
""")


def test_killed_process_then_rerun(store_backend):
    """SIGKILL mid-export: nothing runs on the way down. A rerun cleans up and succeeds."""
    url = store_backend.new_root()
    if store_backend.kind == "local":
        os.makedirs(url)  # an existing, empty destination
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, url], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    if store_backend.kind == "local":
        assert os.listdir(url) == []  # the destination never saw a file
        assert len(siblings(url)) == 1  # the dead run's temp directory
    else:
        left = store_backend.list_files(url)
        assert "config.json" not in left and INCOMPLETE_MARKER in left
        assert "model-00001-of-00004.safetensors" in left

    torch.manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(8)}
    with HfModelWriter(url, specs_from_state_dict(tensors), max_shard_size=40_000) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        summary = writer.finish({"model_type": "llama"}, {})
    assert summary.shard_count == 4
    if store_backend.kind == "local":
        assert len(summary.cleaned) == 1 and siblings(url) == []
    else:
        assert summary.replaced == "interrupted"
    assert store_backend.list_files(url) == ["config.json", "model-00001-of-00004.safetensors",
                                             "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
                                             "model-00004-of-00004.safetensors", "model.safetensors.index.json"]
    assert verify_export(url, {k: ((64, 64), "float32") for k in tensors}) == []


def test_local_interrupted_replace_restores_previous_export(refs, tmp_path):
    """A run killed between the two renames of the fallback replace: the next run puts the
    previous export back (and, without overwrite, then refuses to replace it)."""
    ref, size = refs["fp32-single"]
    url = str(tmp_path / "out")
    export(url, ref, size)
    run_dir = tmp_path / f".out{TMP_INFIX}deadbeef"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid()}))
    os.rename(url, run_dir / "old")
    (run_dir / "new").mkdir()  # the complete new export would be here

    with pytest.raises(UsageError, match="not empty"):
        HfModelWriter(url, ref.specs, max_shard_size=size)
    assert sorted(os.listdir(url)) == ref.files
    assert not run_dir.exists()
    assert verify_export(url, ref.expected) == []


def test_temp_dir_of_a_live_run_is_left_alone(refs, tmp_path):
    ref, size = refs["fp32-single"]
    url = str(tmp_path / "out")
    other = tmp_path / f".out{TMP_INFIX}0123456789ab"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    summary = export(url, ref, size)
    assert summary.cleaned == [] and other.exists()


# -- memory ---------------------------------------------------------------------------------------
MIB = 2**20


def test_local_memory_stays_below_one_tensor(tmp_path):
    """tracemalloc: the writer copies no tensor data into Python buffers (the tensors' own
    memory is not traced; a naive safetensors.torch.save of one 4 MiB shard would show 4 MiB)."""
    tensors = {f"w.{i}": torch.full((MIB // 4,), float(i)) for i in range(16)}  # 1 MiB each
    url = str(tmp_path / "out")
    writer = HfModelWriter(url, specs_from_state_dict(tensors), max_shard_size=4 * MIB)
    tracemalloc.start()
    try:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        summary = writer.finish({"model_type": "x"}, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.shard_count == 4
    assert peak < MIB // 4, peak
    assert verify_export(url, {k: ((MIB // 4,), "float32") for k in tensors}) == []


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_cloud_upload_buffer_bounded(make_backend, kind):
    """24 MiB in 12 MiB shards, 5 MiB upload blocks: at most one block plus one write chunk
    is ever buffered, well under a shard (the writer holds no tensors itself)."""
    backend = make_backend(kind)
    tensors = {f"w.{i}": torch.full((MIB // 4,), float(i)) for i in range(24)}
    url = backend.new_root()
    with HfModelWriter(url, specs_from_state_dict(tensors), max_shard_size=12 * MIB,
                       upload_block_size=5 * MIB) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
            assert writer.peak_buffered_bytes <= 6 * MIB
        summary = writer.finish({"model_type": "x"}, {})
    assert summary.shard_count == 2 and summary.peak_buffered_bytes > 0
    assert summary.peak_buffered_bytes <= 6 * MIB < 12 * MIB
    assert verify_export(url, {k: ((MIB // 4,), "float32") for k in tensors}) == []
    shard = backend.get(backend.join(url, "model-00002-of-00002.safetensors"))
    n = int.from_bytes(shard[:8], "little")
    assert shard[8 + n:8 + n + 4] == torch.tensor([12.0]).numpy().tobytes()  # data lands intact


def test_s3_shard_checked_from_its_upload_still_catches_a_short_shard(make_backend, monkeypatch):
    """A confirmed S3 shard's header comes from the upload, not a re-read; the rest of the check
    stands: a shard that came out short (here every write loses its last 4 bytes) is caught by
    its listed size, and nothing is committed or left."""
    from ckptctl.errors import CkptctlError

    backend = make_backend("s3")
    tensors = {f"w.{i}": torch.full((MIB // 4,), float(i)) for i in range(12)}
    real_write = hf_writer._S3ConcurrentUpload.write

    def lossy_write(self, data):
        data = memoryview(data)
        return real_write(self, data[:-4] if data.nbytes > 64 else data)

    url = backend.new_root()
    monkeypatch.setattr(hf_writer._S3ConcurrentUpload, "write", lossy_write)
    with pytest.raises(CkptctlError, match=r"failed \(nothing committed\): model.safetensors: file is \d+ bytes, "
                                           r"the header describes \d+"):
        with HfModelWriter(url, specs_from_state_dict(tensors), max_shard_size=12 * MIB,
                           upload_block_size=5 * MIB, upload_concurrency=2) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            writer.finish({"model_type": "x"}, {})
    assert writer._confirmed == [0]  # checked from the header uploaded, not re-read
    assert backend.list_files(url) == []


# -- verification and misuse ----------------------------------------------------------------------
def test_verify_export_catches_problems(store_backend, refs, s3_request_counter):
    ref, size = refs["fp32-sharded"]
    url = store_backend.new_root()
    summary = export(url, ref, size)
    s3_request_counter.reset()
    assert verify_export(url, ref.expected) == []
    if store_backend.kind == "s3":  # listing + config + index + one ranged GET per shard
        gets = s3_request_counter.count(method="GET") - s3_request_counter.list_objects()
        assert gets == summary.shard_count + 2

    expected = dict(ref.expected)
    name = "model.layers.0.mlp.up_proj.weight"
    shape, dtype = expected[name]
    expected[name] = ((shape[0] + 1, shape[1]), dtype)
    expected["model.layers.0.self_attn.q_proj.weight"] = (expected["model.layers.0.self_attn.q_proj.weight"][0],
                                                          torch.bfloat16)
    del expected["lm_head.weight"]
    expected["extra.weight"] = ((1,), torch.float32)
    problems = verify_export(url, expected)
    assert any(name in p and "shape" in p for p in problems), problems
    assert any("q_proj" in p and "dtype" in p for p in problems), problems
    assert any("lm_head.weight" in p and "not expected" in p for p in problems), problems
    assert any("extra.weight" in p and "missing" in p for p in problems), problems
    assert len(problems) == 4, problems


def test_verify_export_catches_broken_directory(refs, tmp_path):
    ref, size = refs["fp32-sharded"]
    url = str(tmp_path / "out")
    second = export(url, ref, size).shard_files[1]
    os.remove(os.path.join(url, "config.json"))
    shard = os.path.join(url, second)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 4)
    problems = verify_export(url, ref.expected)
    assert any("config.json" in p for p in problems)
    assert any(second in p and "bytes" in p for p in problems), problems
    assert verify_export(str(tmp_path / "nothing")) == [f"{tmp_path / 'nothing'}: not found"]


def test_add_and_finish_check_the_plan(refs, tmp_path):
    ref, size = refs["fp32-sharded"]
    url = str(tmp_path / "out")
    names = list(ref.state_dict)
    with HfModelWriter(url, ref.specs, max_shard_size=size) as writer:
        with pytest.raises(UsageError, match="out of order"):
            writer.add(names[1], ref.state_dict[names[1]])
        with pytest.raises(UsageError, match="not in the plan"):
            writer.add("bogus", ref.state_dict[names[0]])
        with pytest.raises(UsageError, match="planned"):
            writer.add(names[0], ref.state_dict[names[0]].to(torch.float16))
        with pytest.raises(UsageError, match="planned"):
            writer.add(names[0], ref.state_dict[names[0]][:1])
        writer.add(names[0], ref.state_dict[names[0]])  # a refused add changes nothing
        with pytest.raises(UsageError, match="not added yet"):
            writer.finish(ref.config, {})
        for name in names[1:]:
            writer.add(name, ref.state_dict[name])
        for bad in ("config.json", writer.plan.files[0], "model.safetensors", "../x", "/etc/x", ""):
            with pytest.raises(UsageError):
                writer.finish(ref.config, {bad: b"x"})
        writer.finish(ref.config, ref.extras)
        with pytest.raises(UsageError, match="finished"):
            writer.add(names[0], ref.state_dict[names[0]])
    assert sorted(os.listdir(url)) == ref.files
    with pytest.raises(UsageError, match="no tensors"):
        HfModelWriter(str(tmp_path / "empty"), [], max_shard_size=size)
    with pytest.raises(UsageError, match="twice"):
        plan_shards([("a", (1,), "float32"), ("a", (1,), "float32")], 10)
