"""ckptctl.formats.mcore_to_hf: the table-driven megatron-core -> Hugging Face tensor plan.

Oracles:
- REAL megatron-core checkpoints (tests/realckpt/megatron_writer.py, one launcher for the module):
  their full global mcore tensors (``checkpoint_tensors.safetensors``) go through the plan and
  must equal the HF ``save_pretrained`` reference (``hf/``) bit for bit, with the same key set;
  the plan built from the checkpoint's own DCP ``.metadata`` must be the same plan.
- Synthetic round trips for architectures the writer does not build (Qwen3 with q/k norms and a
  head_dim != hidden/heads, Mistral with MQA, Llama with attention/MLP biases): a tiny HF model
  -> ``save_pretrained`` (the reference) -> an HF->mcore inverse written here -> the plan.
"""

from __future__ import annotations

import json
import pickle
import time

import pytest

torch = pytest.importorskip("torch")

from ckptctl.errors import CkptctlError  # noqa: E402
from ckptctl.formats.mcore_to_hf import (  # noqa: E402
    MappingError,
    Source,
    UnsupportedArchitectureError,
    build_plan,
    convert_state_dict,
    resolve_architecture,
    state_dict_reader,
    supported_architectures,
)

# Test name -> the session fixture's variant (realckpt.megatron_fixtures writes them once).
REAL = {
    "tp2": "tp2",
    "tp2pp2": "tp2pp2",  # 4 layers over 2 stages
    "perlayer": "perlayer",
    "qwen2_tied": "qwen2_verl",  # Qwen2 (QKV bias), tied embeddings
}


@pytest.fixture(scope="module")
def real(megatron_ckpts):
    return {name: megatron_ckpts[variant].component for name, variant in REAL.items()}


def _config(comp) -> dict:
    return json.loads((comp.hf_dir / "config.json").read_text())


def assert_bit_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), k
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), k


class RecordingReader:
    """What a streaming reader does: hands over ONE source (a layer slice of a stacked key) as a
    fresh tensor, and records it."""

    def __init__(self, full: dict):
        self.full = full
        self.reads: list[Source] = []

    def __call__(self, src: Source):
        self.reads.append(src)
        t = self.full[src.key]
        return (t if src.layer is None else t[src.layer]).clone()


# ------------------------------------------------------------------------------------------
# real megatron-core checkpoints
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL))
def test_real_checkpoint_matches_hf_reference(real, name):
    c = real[name]
    full = c.reference_tensors()  # every mcore key -> full global tensor (model + optimizer)
    model_keys = {k for k in full if not k.startswith("optimizer.")}
    plan = build_plan(_config(c), full)
    assert plan.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.params["arch"]]
    assert plan.geometry.num_layers == c.params["num_layers"] and plan.geometry.head_dim == c.info["head_dim"]

    reader = RecordingReader(full)
    it = plan.iter_tensors(reader)
    first_name, _ = next(it)  # streaming: only the first step's source was read
    assert first_name == "model.embed_tokens.weight" and len(reader.reads) == 1
    out = {first_name: _, **dict(it)}

    want = c.reference_hf_state_dict()
    assert_bit_equal(out, want)
    if c.params["tie_embeddings"]:
        assert "lm_head.weight" not in out  # save_pretrained drops the tied lm_head; so does the plan
    assert len(plan.hf_names) == len(set(plan.hf_names)) == len(want)
    assert {o.name: o.shape for o in plan.outputs} == {k: tuple(v.shape) for k, v in want.items()}

    # every model key consumed, optimizer keys ignored, nothing skipped in the reference tensors
    assert plan.consumed == model_keys
    assert set(plan.ignored) == set(full) - model_keys
    assert plan.skipped == {} and plan.warnings == []

    # memory: stacked keys are only ever read one layer at a time, each source exactly once
    assert len(reader.reads) == len(set(reader.reads)) == sum(len(s.sources) for s in plan.steps)
    for src in reader.reads:
        stacked = src.key.startswith("decoder.layers.") and not src.key.split(".")[2].isdigit()
        assert (src.layer is not None) == stacked, src
    largest = max(v.numel() if k.split(".")[2:3] != ["layers"] or k.split(".")[2].isdigit()
                  else v[0].numel() for k, v in full.items() if k in model_keys)
    assert plan.max_step_numel == largest == c.info["padded_vocab_size"] * c.params["hidden"]


def test_plan_from_real_dcp_metadata_only(real):
    """The plan needs only names + global shapes: the checkpoint's own ``.metadata`` (torch DCP,
    no .distcp data read) gives the same plan, with megatron's ``_extra_state`` objects skipped."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("tp2", "perlayer", "qwen2_tied"):
        c = real[name]
        md = FileSystemReader(str(c.ckpt_dir)).read_metadata().state_dict_metadata
        from_md = build_plan(_config(c), md)
        from_tensors = build_plan(_config(c), c.reference_tensors())
        assert from_md.to_dict()["steps"] == from_tensors.to_dict()["steps"]
        extra = {k for k in md if "_extra_state" in k}
        assert extra and set(from_md.skipped) == extra
        assert set(from_md.ignored) == {k for k in md if k.startswith("optimizer.")}


def test_convert_state_dict_and_pickle(real):
    c = real["tp2pp2"]
    full = c.reference_tensors()
    assert_bit_equal(convert_state_dict(_config(c), full), c.reference_hf_state_dict())
    plan = build_plan(_config(c), {k: tuple(v.shape) for k, v in full.items()})  # shapes only
    clone = pickle.loads(pickle.dumps(plan))  # transforms are picklable (worker processes)
    assert clone.to_dict() == plan.to_dict()
    assert_bit_equal(clone.convert(state_dict_reader(full)), c.reference_hf_state_dict())
    json.dumps(plan.to_dict())  # JSON-able for --dry-run style output


# ------------------------------------------------------------------------------------------
# synthetic round trips: Qwen3, Mistral, Llama with biases
# ------------------------------------------------------------------------------------------


def hf_to_mcore_inverse(hf: dict, cfg: dict, *, padded_vocab: int, layout: str = "stacked",
                        fused_norms: bool = True) -> dict:
    """The test's own HF -> mcore mapping (written independently of the module: explicit loops
    over query groups).  ``layout``: "stacked" | "per_layer" | "mixed" (attention stacked, the
    rest per layer).  Padding rows are filled with 7.0 so a wrong vocab cut shows."""
    H, nh, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    ng = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or H // nh
    qpg = nh // ng

    def interleave(q, k, v):
        parts = []
        for g in range(ng):
            parts += [q[g * qpg * d:(g + 1) * qpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        return torch.cat(parts, 0)

    def pad(t):
        out = torch.full((padded_vocab, t.shape[1]), 7.0, dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    ln1 = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    ln2 = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    layers: dict[str, list] = {}
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."

        def put(name, t):
            layers.setdefault(name, []).append(t)

        put(ln1, hf[p + "input_layernorm.weight"])
        put("self_attention.linear_qkv.weight",
            interleave(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]))
        if a + "q_proj.bias" in hf:
            put("self_attention.linear_qkv.bias",
                interleave(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"]))
        put("self_attention.linear_proj.weight", hf[a + "o_proj.weight"])
        if a + "o_proj.bias" in hf:
            put("self_attention.linear_proj.bias", hf[a + "o_proj.bias"])
        if a + "q_norm.weight" in hf:
            put("self_attention.q_layernorm.weight", hf[a + "q_norm.weight"])
            put("self_attention.k_layernorm.weight", hf[a + "k_norm.weight"])
        put(ln2, hf[p + "post_attention_layernorm.weight"])
        m = p + "mlp."
        put("mlp.linear_fc1.weight", torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]))
        if m + "gate_proj.bias" in hf:
            put("mlp.linear_fc1.bias", torch.cat([hf[m + "gate_proj.bias"], hf[m + "up_proj.bias"]]))
        put("mlp.linear_fc2.weight", hf[m + "down_proj.weight"])
        if m + "down_proj.bias" in hf:
            put("mlp.linear_fc2.bias", hf[m + "down_proj.bias"])

    out = {"embedding.word_embeddings.weight": pad(hf["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf["model.norm.weight"].clone()}
    if "lm_head.weight" in hf:
        out["output_layer.weight"] = pad(hf["lm_head.weight"])
    for name, ts in layers.items():
        stacked = layout == "stacked" or (layout == "mixed" and name.startswith("self_attention."))
        if stacked:
            out[f"decoder.layers.{name}"] = torch.stack(ts).contiguous()
        else:
            out.update({f"decoder.layers.{i}.{name}": t.clone() for i, t in enumerate(ts)})
    return out


SYNTH = {
    # Qwen3: q/k norms, head_dim 24 != 64/4, tied embeddings, bf16
    "qwen3": dict(cls="Qwen3", cfg=dict(head_dim=24, tie_word_embeddings=True), dtype="bfloat16",
                  layout="stacked", fused=True),
    # Qwen3 untied, with attention_bias (q/k/v/o biases), per-layer keys
    "qwen3_bias": dict(cls="Qwen3", cfg=dict(head_dim=16, attention_bias=True), dtype="float32",
                       layout="per_layer", fused=True),
    # Mistral: MQA (1 kv head), per-layer keys, non-fused norm names
    "mistral": dict(cls="Mistral", cfg=dict(num_key_value_heads=1, sliding_window=None), dtype="float32",
                    layout="per_layer", fused=False),
    # Llama: MHA, attention + MLP biases, mixed stacked/per-layer keys
    "llama_bias": dict(cls="Llama", cfg=dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
                       dtype="float32", layout="mixed", fused=True),
}


def _tiny_hf(tmp_path, case: dict):
    """A tiny HF model with random weights (norms included), saved with save_pretrained:
    returns (config.json dict, the saved tensors)."""
    import transformers
    from safetensors.torch import load_file

    kw = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(case["cfg"])
    config = getattr(transformers, case["cls"] + "Config")(**kw)
    config.architectures = [case["cls"] + "ForCausalLM"]
    gen = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, case["cls"] + "ForCausalLM")(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    model.to(getattr(torch, case["dtype"]))
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    hf = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    return cfg, hf


@pytest.mark.parametrize("name", list(SYNTH))
def test_synthetic_round_trip(tmp_path, name):
    case = SYNTH[name]
    cfg, hf = _tiny_hf(tmp_path, case)
    if cfg.get("tie_word_embeddings"):
        assert "lm_head.weight" not in hf
    mcore = hf_to_mcore_inverse(hf, cfg, padded_vocab=384, layout=case["layout"], fused_norms=case["fused"])
    mcore["optimizer.state.exp_avg.embedding.word_embeddings.weight"] = torch.zeros(1)  # ignored
    plan = build_plan(cfg, mcore)
    assert plan.architecture == case["cls"] + "ForCausalLM"
    reader = RecordingReader(mcore)
    out = plan.convert(reader)
    assert_bit_equal(out, hf)
    assert plan.consumed == {k for k in mcore if not k.startswith("optimizer.")}
    for src in reader.reads:
        if src.key.startswith("decoder.layers.") and not src.key.split(".")[2].isdigit():
            assert src.layer is not None


# ------------------------------------------------------------------------------------------
# errors and edge cases (shapes only: no tensors needed)
# ------------------------------------------------------------------------------------------

LLAMA_CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=1000,
                 tie_word_embeddings=False)


def llama_shapes(layers: int = 2, vocab: int = 1024) -> dict:
    L = "decoder.layers."
    return {
        "embedding.word_embeddings.weight": (vocab, 64),
        L + "self_attention.linear_qkv.layer_norm_weight": (layers, 64),
        L + "self_attention.linear_qkv.weight": (layers, 128, 64),
        L + "self_attention.linear_proj.weight": (layers, 64, 64),
        L + "mlp.linear_fc1.layer_norm_weight": (layers, 64),
        L + "mlp.linear_fc1.weight": (layers, 256, 64),
        L + "mlp.linear_fc2.weight": (layers, 64, 128),
        "decoder.final_layernorm.weight": (64,),
        "output_layer.weight": (vocab, 64),
    }


def test_unsupported_architecture():
    with pytest.raises(CkptctlError) as e:
        build_plan(dict(LLAMA_CFG, architectures=["GPT2LMHeadModel"]), llama_shapes())
    msg = str(e.value)
    assert isinstance(e.value, UnsupportedArchitectureError) and "\n" not in msg
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert arch in msg and arch in supported_architectures()
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'"):
        resolve_architecture({"model_type": "gpt2"})


def test_architecture_resolution_fallbacks():
    assert resolve_architecture({"architectures": ["FSDPQwen2ForCausalLM"]}).name == "Qwen2ForCausalLM"
    assert resolve_architecture({"model_type": "mistral"}).name == "MistralForCausalLM"
    plan = build_plan(dict(LLAMA_CFG, architectures=None), llama_shapes(), architecture="MistralForCausalLM")
    assert plan.architecture == "MistralForCausalLM"


def test_moe_keys_in_a_dense_architecture_are_refused():
    shapes = dict(llama_shapes(), **{"decoder.layers.mlp.router.weight": (2, 8, 64),
                                     "decoder.layers.mlp.experts.linear_fc1.weight0": (2, 256, 64)})
    with pytest.raises(MappingError) as e:
        build_plan(LLAMA_CFG, shapes)
    msg = str(e.value)
    assert "MoE layers, but LlamaForCausalLM is a dense architecture" in msg and "\n" not in msg
    assert "decoder.layers.mlp.router.weight" in msg and "decoder.layers.mlp.experts.linear_fc1.weight0" in msg


def test_unmapped_missing_and_bad_shapes_are_named():
    with pytest.raises(MappingError, match=r"unmapped decoder\.layers\.\{0,1\}\.self_attention\.q_layernorm"):
        shapes = dict(llama_shapes(), **{f"decoder.layers.{i}.self_attention.q_layernorm.weight": (16,)
                                         for i in range(2)})
        build_plan(LLAMA_CFG, shapes)  # Llama has no q/k norm
    shapes = llama_shapes()
    del shapes["decoder.layers.mlp.linear_fc2.weight"]
    with pytest.raises(MappingError, match=r"missing decoder\.layers\.mlp\.linear_fc2\.weight"):
        build_plan(LLAMA_CFG, shapes)
    with pytest.raises(MappingError, match=r"shape mismatch .*linear_qkv\.weight\[0\] \[128, 64\] "
                                           r"\(expected \[192, 64\]\)"):
        build_plan(dict(LLAMA_CFG, head_dim=24), llama_shapes())
    with pytest.raises(MappingError, match="leading layer axis"):
        build_plan(dict(LLAMA_CFG, num_hidden_layers=3), llama_shapes())
    with pytest.raises(MappingError, match=r"embedding\.word_embeddings\.weight \[900, 64\]"):
        build_plan(LLAMA_CFG, llama_shapes(vocab=900))  # fewer rows than vocab_size
    with pytest.raises(MappingError, match="qkv.bias"):
        build_plan(dict(LLAMA_CFG, architectures=["Qwen2ForCausalLM"]), llama_shapes())  # qwen2 needs the bias


def test_extra_state_skipped_and_tie_handling():
    shapes = dict(llama_shapes(), **{"decoder.layers.self_attention.core_attention._extra_state": (),
                                     "rng_state/shard_0_1": (), "optimizer.state.param.output_layer.weight": (1,)})
    plan = build_plan(LLAMA_CFG, shapes)
    assert set(plan.skipped) == {"decoder.layers.self_attention.core_attention._extra_state"}
    assert plan.ignored == ["optimizer.state.param.output_layer.weight", "rng_state/shard_0_1"]
    assert plan.hf_names[0] == "model.embed_tokens.weight" and plan.hf_names[-1] == "lm_head.weight"

    # tied config + separate output_layer: not exported, but said so
    plan = build_plan(dict(LLAMA_CFG, tie_word_embeddings=True), llama_shapes())
    assert "lm_head.weight" not in plan.hf_names and "output_layer.weight" in plan.skipped and plan.warnings

    # untied config, no output_layer (Megatron shared them): lm_head = the embedding, own storage
    shapes = llama_shapes()
    del shapes["output_layer.weight"]
    plan = build_plan(LLAMA_CFG, shapes)
    assert plan.warnings and plan.hf_names[-1] == "lm_head.weight"
    emb = torch.randn(1024, 64)
    step = plan.steps[-1]
    assert [s.key for s in step.sources] == ["embedding.word_embeddings.weight"]
    (lm,) = step.transform(emb)
    assert torch.equal(lm, emb[:1000]) and lm.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()


def test_apply_checks_read_shapes():
    plan = build_plan(LLAMA_CFG, llama_shapes())
    with pytest.raises(MappingError, match="read shape"):
        plan.steps[0].apply(torch.zeros(1000, 64))
