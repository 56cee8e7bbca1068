"""``ckptctl diff`` on REAL checkpoints (the session fixtures ``fsdp_ckpts``, ``fsdp_tree`` and
``megatron_ckpts``), through the CLI (``--json``) and the library.

The figures are checked against numbers computed here independently: the fixture writers'
reference state dicts (``reference_full_state.safetensors``, saved from the unsharded torch
models) loaded with safetensors and compared with torch in float64.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.ops.diff import diff  # noqa: E402
from ckptctl.ops.export import export_hf  # noqa: E402
from ckptctl.ops.reshard_fsdp import reshard_fsdp  # noqa: E402
from ckptctl.ops.reshard_megatron import reshard_megatron  # noqa: E402

runner = CliRunner()
REPORT_KEYS = {"a", "b", "atol", "rtol", "equal", "compared", "differing", "only_in_a", "only_in_b", "mismatches",
               "total", "layers", "modules", "tensors", "notes", "seconds"}
STATS_KEYS = {"name", "tensors", "numel", "max_abs_diff", "rel_change", "equal"}


def run_diff(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, ["diff", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def diff_json(a, b, *args, code: int) -> dict:
    got, stdout, stderr = run_diff(a, b, *args, "--json")
    assert got == code, (got, stdout, stderr)
    assert stderr == ""  # no progress bar with --json
    return json.loads(stdout)


def refused(*args, code: int, match: str) -> None:
    got, stdout, stderr = run_diff(*args, "--json")
    assert got == code, (got, stdout, stderr)
    assert json.loads(stdout) == {"error": stderr.removeprefix("ckptctl: error: ").rstrip("\n"), "exit_code": code}
    assert stderr.startswith("ckptctl: error: ") and match in stderr, stderr
    assert stderr.count("\n") == 1  # one line, no traceback


def assert_equal_report(doc: dict, tensors: int) -> None:
    assert doc["equal"] is True and doc["differing"] == 0
    assert doc["compared"] == tensors and doc["total"]["tensors"] == tensors
    assert doc["only_in_a"] == [] and doc["only_in_b"] == [] and doc["mismatches"] == []
    assert doc["total"]["max_abs_diff"] == 0 and doc["total"]["rel_change"] == 0
    assert all(row["equal"] for row in doc["layers"] + doc["modules"])


def hf_tensor_count(export_dir: Path) -> int:
    return sum(len(load_file(str(f))) for f in export_dir.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------
# equal: a checkpoint and its export, its reshard
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w2", "w3_tied"])
def test_fsdp_step_equals_its_export(fsdp_ckpts, tmp_path, name):
    comp = fsdp_ckpts[name]
    out = tmp_path / "export"
    export_hf(str(comp.path), str(out))
    count = hf_tensor_count(out)
    doc = diff_json(comp.path, out, code=0)
    assert_equal_report(doc, count)
    assert doc["a"]["backend"] == "fsdp" and doc["b"]["backend"] == "hf"
    assert any("model.rotary_emb.inv_freq" in n and "(A)" in n for n in doc["notes"])  # never exported
    if name == "w3_tied":
        assert any("lm_head.weight" in n for n in doc["notes"])  # tied: save_pretrained omits it
    # either order; the step directory as well as the component
    assert_equal_report(diff_json(out, comp.path.parent, code=0), count)


@pytest.mark.parametrize("name", ["tp2", "qwen2_verl"])
def test_megatron_equals_its_export_through_the_name_mapping(megatron_ckpts, tmp_path, name):
    ck = megatron_ckpts[name]
    out = tmp_path / "export"
    export_hf(str(ck.out_dir), str(out))
    count = hf_tensor_count(out)
    doc = diff_json(ck.out_dir, out, code=0)
    assert_equal_report(doc, count)
    assert doc["a"]["backend"] == "megatron"
    assert {r["name"] for r in doc["modules"]} >= {"self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj",
                                                   "mlp.up_proj", "embed_tokens"}
    # against save_pretrained of the same weights (not written by ckptctl), HF side first
    assert_equal_report(diff_json(ck.reference_hf_dir, ck.out_dir, code=0), count)


def test_megatron_side_read_once_whatever_the_order(megatron_ckpts, tmp_path, monkeypatch):
    """B Megatron, A an export: tensors are taken in the Megatron side's order, so each source
    slice is read once (a fused QKV is not read again for k and v)."""
    ck = megatron_ckpts["tp2"]
    reads: list[tuple] = []
    real = MegatronReader.read_tensor

    def counted(self, name, index=None):
        reads.append((name, index))
        return real(self, name, index)

    monkeypatch.setattr(MegatronReader, "read_tensor", counted)
    report = diff(str(ck.reference_hf_dir), str(ck.out_dir))
    assert report.equal and report.compared > 0
    assert len(reads) == len(set(reads)), [r for r in reads if reads.count(r) > 1][:5]


def test_fsdp_checkpoint_equals_its_reshard(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w2"]
    out = tmp_path / "w3" / "policy"
    reshard_fsdp(str(comp.path), str(out), world_size=3)
    doc = diff_json(comp.path, out, code=0)
    assert_equal_report(doc, doc["compared"])
    assert doc["compared"] > 0


def test_megatron_tp2_equals_its_tp1_reshard(megatron_ckpts, tmp_path):
    ck = megatron_ckpts["tp2"]
    out = tmp_path / "tp1"
    reshard_megatron(str(ck.out_dir), str(out), tp=1, pp=1)
    doc = diff_json(ck.out_dir, out, code=0)
    assert doc["a"]["backend"] == doc["b"]["backend"] == "megatron"
    assert_equal_report(doc, doc["compared"])
    assert doc["compared"] > 0


# ------------------------------------------------------------------------------------------
# two steps of one run: the figures
# ------------------------------------------------------------------------------------------
def reference_state(fsdp_tree: Path, step: int) -> dict:
    ref = Path(str(fsdp_tree) + ".reference") / f"global_step_{step}" / "policy" / "reference_full_state.safetensors"
    return {k: v for k, v in load_file(str(ref)).items() if not k.endswith("rotary_emb.inv_freq")}


def expected_per_layer(a: dict, b: dict) -> dict[str, tuple[float, float]]:
    """layer -> (max |A-B|, ||A-B|| / ||A||), the layer's tensors taken as one vector."""
    sums: dict[str, list[float]] = {}
    for name in a:
        m = re.match(r"^(model\.layers\.\d+)\.", name)
        if not m:
            continue
        x, y = a[name].double(), b[name].double()
        entry = sums.setdefault(m[1], [0.0, 0.0, 0.0])
        entry[0] = max(entry[0], (x - y).abs().max().item())
        entry[1] += torch.sum((x - y) ** 2).item()
        entry[2] += torch.sum(x ** 2).item()
    return {layer: (mx, math.sqrt(d) / math.sqrt(n)) for layer, (mx, d, n) in sums.items()}


def test_two_steps_differ_with_the_right_per_layer_figures(fsdp_tree):
    a, b = reference_state(fsdp_tree, 2), reference_state(fsdp_tree, 4)
    want = expected_per_layer(a, b)
    assert len(want) >= 2 and all(rel > 0 for _, rel in want.values())

    doc = diff_json(fsdp_tree / "global_step_2", fsdp_tree / "global_step_4", "--tensors", code=1)
    assert doc["equal"] is False and doc["a"]["step"] == 2 and doc["b"]["step"] == 4
    assert doc["only_in_a"] == doc["only_in_b"] == [] and doc["mismatches"] == []
    got = {row["name"]: row for row in doc["layers"]}
    for layer, (max_abs, rel) in want.items():
        assert got[layer]["max_abs_diff"] == pytest.approx(max_abs, rel=1e-12, abs=0)
        assert got[layer]["rel_change"] == pytest.approx(rel, rel=1e-9)
        assert got[layer]["equal"] is False
    layer_names = [r["name"] for r in doc["layers"] if r["name"].startswith("model.layers.")]
    assert layer_names == sorted(want, key=lambda n: int(n.rsplit(".", 1)[1]))

    per_tensor = {row["name"]: row for row in doc["tensors"]}
    assert len(per_tensor) == doc["compared"]
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        x, y = a[name].double(), b[name].double()
        assert per_tensor[name]["max_abs_diff"] == pytest.approx((x - y).abs().max().item(), rel=1e-12)
        assert per_tensor[name]["rel_change"] == pytest.approx((torch.linalg.norm(x - y) / torch.linalg.norm(x)).item(),
                                                               rel=1e-9)
    want_differing = sum(1 for n in per_tensor if not torch.equal(a[n], b[n]))
    assert doc["differing"] == want_differing > 0

    # the per-module-type rollup of q_proj against the same sums
    q = [n for n in a if n.endswith("self_attn.q_proj.weight")]
    rel_q = math.sqrt(sum(torch.sum((a[n].double() - b[n].double()) ** 2).item() for n in q)) / \
        math.sqrt(sum(torch.sum(a[n].double() ** 2).item() for n in q))
    module = {row["name"]: row for row in doc["modules"]}["self_attn.q_proj"]
    assert module["tensors"] == len(q) and module["rel_change"] == pytest.approx(rel_q, rel=1e-9)


def test_tolerances_flip_the_exit_code(fsdp_tree):
    a, b = reference_state(fsdp_tree, 2), reference_state(fsdp_tree, 4)
    step2, step4 = fsdp_tree / "global_step_2", fsdp_tree / "global_step_4"
    max_abs = max((a[n].double() - b[n].double()).abs().max().item() for n in a)

    assert diff_json(step2, step4, "--atol", repr(max_abs * 1.01), code=0)["equal"] is True
    doc = diff_json(step2, step4, "--atol", repr(max_abs * 0.5), code=1)
    want = sum(1 for n in a if not torch.all((a[n].double() - b[n].double()).abs() <= max_abs * 0.5))
    assert doc["differing"] == want > 0

    # the smallest rtol that holds everywhere B != 0 (where B == 0 and A != 0 only atol can help)
    ratios = []
    for n in a:
        x, y = a[n].double(), b[n].double()
        nz = y != 0
        ratios.append(((x - y).abs()[nz] / y.abs()[nz]).max().item() if nz.any() else 0.0)
    need = max(ratios)
    zero_b_gap = max(((a[n].double() - b[n].double()).abs()[b[n] == 0].max().item() if (b[n] == 0).any() else 0.0)
                     for n in a)
    atol = ["--atol", repr(zero_b_gap * 1.01)] if zero_b_gap else []
    assert diff_json(step2, step4, "--rtol", repr(need * 1.01), *atol, code=0)["equal"] is True
    assert diff_json(step2, step4, "--rtol", repr(need * 0.5), *atol, code=1)["equal"] is False


# ------------------------------------------------------------------------------------------
# missing tensors, mismatches
# ------------------------------------------------------------------------------------------
def rewrite_export(export_dir: Path, change) -> None:
    """Rewrite the single-shard export's model.safetensors with ``change(tensors)`` applied."""
    shard = export_dir / "model.safetensors"
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_tensor_is_listed(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w2"]
    out = tmp_path / "export"
    export_hf(str(comp.path), str(out))
    gone = "model.layers.1.mlp.up_proj.weight"
    rewrite_export(out, lambda t: t.pop(gone))

    doc = diff_json(comp.path, out, code=1)
    assert doc["equal"] is False and doc["only_in_a"] == [gone] and doc["only_in_b"] == []
    assert doc["differing"] == 0 and doc["compared"] == hf_tensor_count(out)  # the rest are equal
    doc = diff_json(out, comp.path, code=1)
    assert doc["only_in_b"] == [gone] and doc["only_in_a"] == []

    code, stdout, _ = run_diff(comp.path, out)
    assert code == 1 and f"only in A: {gone}" in stdout and "equal: no" in stdout


def test_dtype_and_shape_mismatches_are_listed(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w2"]
    out = tmp_path / "export"
    export_hf(str(comp.path), str(out))
    cast, cut = "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"

    def change(t):
        t[cast] = t[cast].to(torch.float64)
        t[cut] = t[cut][:-1].contiguous()

    rewrite_export(out, change)
    doc = diff_json(comp.path, out, code=1)
    by_name = {m["name"]: m for m in doc["mismatches"]}
    assert set(by_name) == {cast, cut}
    assert by_name[cast]["a_dtype"] == "float32" and by_name[cast]["b_dtype"] == "float64"
    assert by_name[cut]["a_shape"][0] == by_name[cut]["b_shape"][0] + 1
    # a float64 copy of the same values is still compared (and equal); a cut tensor is not
    assert doc["differing"] == 0 and doc["compared"] == hf_tensor_count(out) - 1


# ------------------------------------------------------------------------------------------
# output: --json shape, human tables, bad inputs
# ------------------------------------------------------------------------------------------
def test_json_document_shape(fsdp_tree):
    doc = diff_json(fsdp_tree / "global_step_2", fsdp_tree, code=1)  # a tree: its pointer target (4)
    assert set(doc) == REPORT_KEYS
    assert set(doc["a"]) == set(doc["b"]) == {"path", "backend", "component", "step"}
    assert doc["b"]["step"] == 4 and doc["b"]["path"].endswith("global_step_4/policy")
    assert doc["a"]["path"] == str(fsdp_tree / "global_step_2" / "policy")  # as typed
    assert doc["tensors"] is None  # only with --tensors
    for row in doc["layers"] + doc["modules"] + [doc["total"]]:
        assert set(row) == STATS_KEYS
    assert sum(r["tensors"] for r in doc["layers"]) == sum(r["tensors"] for r in doc["modules"]) == doc["compared"]
    assert doc["atol"] == 0 and doc["rtol"] == 0

    critic = diff_json(fsdp_tree / "global_step_2", fsdp_tree / "global_step_4", "--component", "critic", code=1)
    assert critic["a"]["component"] == critic["b"]["component"] == "critic"
    assert "value_head" in {r["name"] for r in critic["modules"]}


def test_human_output(fsdp_tree):
    code, stdout, _ = run_diff(fsdp_tree / "global_step_2", fsdp_tree / "global_step_4", "--tensors")
    assert code == 1
    for text in ("A: ", "(fsdp, step 2)", "per layer", "per module type", "per tensor", "model.layers.0",
                 "self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight", "equal: no"):
        assert text in stdout, text
    code, stdout, _ = run_diff(fsdp_tree / "global_step_4", fsdp_tree)
    assert code == 0 and "equal: yes" in stdout and "per tensor" not in stdout


def test_bad_inputs(fsdp_ckpts, fsdp_tree, tmp_path):
    step = fsdp_tree / "global_step_2"
    refused(tmp_path / "nowhere", step, code=3, match="nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    refused(step, tmp_path / "notes", code=5, match="not a checkpoint")
    refused(step, step, "--atol", "-1", code=2, match="--atol")
    refused(step, step, "--component", "actor", code=2, match="--component")
    refused(fsdp_ckpts["w2"].path.parent, step, "--component", "critic", code=2, match="no critic/ component")

    broken = tmp_path / "broken" / "policy"
    shutil.copytree(fsdp_ckpts["w2"].path, broken)
    (broken / "model_world_size_2_rank_1.pt").unlink()
    refused(broken, step, code=1, match="is incomplete")
    with pytest.raises(Exception) as info:
        diff(str(step), str(step), rtol=float("nan"))
    assert info.value.exit_code == 2


def test_object_stores_and_a_sharded_export(megatron_ckpts, make_backend):
    """A sharded export on S3 against its Megatron (TP2 x PP2) source on GCS."""
    gs, s3 = make_backend("gs"), make_backend("s3")
    ck = megatron_ckpts["tp2pp2"]
    src = gs.new_root() + "/ckpt/global_step_1/policy"
    gs.upload_dir(str(ck.out_dir), src)
    out = s3.new_root()
    export_hf(str(ck.out_dir), out, max_shard_size="100KB")
    assert "model.safetensors.index.json" in s3.list_files(out)
    doc = diff_json(out, src, code=0)
    assert doc["a"]["path"] == out and doc["b"]["path"] == src and doc["b"]["step"] == 1
    assert doc["equal"] and doc["compared"] > 0 and doc["only_in_a"] == doc["only_in_b"] == []
