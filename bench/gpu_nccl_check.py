"""GPU check: Megatron reshard on the torch.distributed path inside an NCCL group (run on a GPU node).

Usage: python bench/gpu_nccl_check.py single|nccl SRC OUT TP PP   (nccl: under torchrun)
"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import torch.distributed as dist

mode, src, out, tp, pp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from ckptctl.ops.reshard_megatron import reshard_megatron
from ckptctl.storage import open_store
from ckptctl.formats.megatron import MegatronReader

t0 = time.perf_counter()
if mode == "nccl":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    s = reshard_megatron(src, out, tp=tp, pp=pp, distributed=True)
    x = torch.ones(1, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(x)
    print("backend", dist.get_backend(), "world", dist.get_world_size(), "all_reduce", x.item())
else:
    s = reshard_megatron(src, out, tp=tp, pp=pp)
wall = time.perf_counter() - t0
if int(os.environ.get("RANK", "0")) == 0:
    a, b = MegatronReader(open_store(src)), MegatronReader(open_store(out))
    ia, ib = a.tensor_infos(), b.tensor_infos()
    assert set(ia) == set(ib), set(ia) ^ set(ib)
    same = all(torch.equal(a.read_tensor(k), b.read_tensor(k)) for k in ia)
    chunks = sum(len(i.pieces) for i in ib.values())
    d = s.to_dict()
    print(json.dumps({"mode": mode, "wall_s": round(wall, 3), "bit_identical": same, "tensors": len(ib),
                      "target_chunks": chunks, "summary_seconds": d.get("seconds"), "bytes": d.get("bytes"),
                      "target": d.get("target"), "optimizer": d.get("optimizer"), "processes": d.get("processes")}))
if mode == "nccl":
    dist.destroy_process_group()
