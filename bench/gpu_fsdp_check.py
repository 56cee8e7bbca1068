"""GPU check: resume an FSDP checkpoint resharded by ckptctl in FSDP2 on the GPU (NCCL), one step.

Usage (under torchrun, one process per GPU; falls back to gloo on CPU where there is no GPU)::

    torchrun --nproc_per_node 1 bench/gpu_fsdp_check.py SRC META_JSON CPU_REF_JSON CPU_AFTER_SAFETENSORS

SRC is a ``convert-reshard --world-size 1 [--device-type cuda]`` output of a test fixture whose
``reference_meta.json`` is META_JSON (a LoRA fixture is wrapped with peft as SkyRL does). The
model is built as the fixture writer builds it, ``fully_shard`` on a 1-D ("fsdp",) mesh of the
device, loaded with ``load_state_dict(strict=True)`` (optimizer and scheduler too), then trained
one step on tests/realckpt/fsdp_resume_check.py's fixed batch. Prints the loss beside the CPU
run's (CPU_REF_JSON) and the largest difference of the updated weights (CPU_AFTER_SAFETENSORS).
Files are loaded with ``weights_only=False`` (our own test files). An older torch on the GPU
machine cannot unpickle DTensors pickled by a newer one (torch 2.11 lacks 2.13's mesh layout
class), so SRC may also hold the same files with each DTensor replaced by its local tensor:
those are wrapped back (``DTensor.from_local``) on the GPU mesh, like the parameters.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

BATCH_SEED, BATCH_SHAPE = 4242, (4, 12)  # realckpt.fsdp_resume_check's batch


def main(src: str, meta_path: str, ref_path: str, after_path: str) -> None:
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers.optimization import get_constant_schedule_with_warmup

    from realckpt import tiny_models as tm

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    t0 = time.perf_counter()
    meta = json.load(open(meta_path))
    model = tm.make_model(meta["arch"], meta["seed"], persistent_buffers=meta["persistent_buffers"],
                          vocab=meta["vocab"], hidden=meta["hidden"], layers=meta["layers"], heads=meta["heads"],
                          kv_heads=meta["kv_heads"], intermediate=meta["intermediate"], tie=meta["tie"])
    if meta.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **meta["lora"]}))
    model.to(device)
    mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    layer_cls = tm.decoder_layer_class_name(meta["arch"])
    for m in list(model.modules()):  # as SkyRL's apply_fsdp2 (and the fixture writer)
        if type(m).__name__ == layer_cls or (isinstance(m, torch.nn.Embedding) and not meta["tie"]):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank, w = dist.get_rank(), dist.get_world_size()

    def load(kind):
        return torch.load(os.path.join(src, f"{kind}_world_size_{w}_rank_{rank}.pt"), map_location=device,
                          weights_only=False)

    def as_dtensor(value, like):
        """A local piece saved without its DTensor wrapper, wrapped as ``like`` (a parameter)."""
        if isinstance(like, DTensor) and not isinstance(value, DTensor):
            return DTensor.from_local(value.to(device), like.device_mesh, like.placements, run_check=False,
                                      shape=like.shape, stride=like.stride())
        return value

    params = dict(model.named_parameters())
    msd = {k: as_dtensor(v, params.get(k)) for k, v in load("model").items()}
    model.load_state_dict(msd, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=meta["lr"], betas=(0.9, 0.999), weight_decay=0.01)
    osd = load("optim")
    plist = list(model.parameters())
    for idx, state in osd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = as_dtensor(state[key], plist[idx])
    opt.load_state_dict(osd)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=0)
    sched.load_state_dict(load("extra_state")["lr_scheduler"])
    t_load = time.perf_counter() - t0

    g = torch.Generator()
    g.manual_seed(BATCH_SEED)
    ids = torch.randint(3, min(meta["vocab"], 320), BATCH_SHAPE, generator=g).to(device)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm=1.0)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    opt.step()
    sched.step()
    after = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}
    if rank == 0:
        ref = json.load(open(ref_path))
        want = load_file(after_path)
        diff = max((after[k].double() - want[k].double()).abs().max().item() for k in want)
        print(json.dumps({
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "backend": dist.get_backend(), "world_size": w, "lora": bool(meta.get("lora")),
            "load_s": round(t_load, 3), "loss": loss.item(), "cpu_loss": ref["loss"],
            "grad_norm": norm.item(), "cpu_grad_norm": ref["grad_norm"],
            "keys_match": sorted(after) == sorted(want), "max_abs_diff_after_step": diff}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
