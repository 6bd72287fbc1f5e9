"""
A tiny embedding + MLP model trained for a few steps with MuonAdamW, in one process or as one rank of
a gloo process group. tests/test_optim.py runs it as 2 processes and compares with 1 process.

Each rank takes its slice of one fixed batch and the mean loss over that slice, so the average of the
ranks' losses (which is what the optimizer's gradient averaging sees) equals the full-batch mean loss.

    python tests/_dist_optim_worker.py OUT_DIR                              # 1 process, whole batch
    torchrun --nproc_per_node=2 tests/_dist_optim_worker.py OUT_DIR         # 2 ranks, half each

Each rank writes OUT_DIR/rank{r}.pt: {"params": model state dict, "optim": its optimizer state dict}.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from picochat.common import shutdown_distributed
from picochat.optim import MuonAdamW

VOCAB, DIM, BATCH, SEQ, STEPS = 16, 32, 8, 4, 5


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, DIM),
        nn.Linear(DIM, 2 * DIM, bias=False), nn.ReLU(),  # tall 64x32 matrix
        nn.Linear(2 * DIM, DIM, bias=False), nn.ReLU(),  # wide 32x64 matrix
        nn.Linear(DIM, DIM, bias=False), nn.ReLU(),      # two same-shape matrices: one batched NS stack
        nn.Linear(DIM, DIM, bias=False),
        nn.Linear(DIM, VOCAB),                           # head: weight and 1-D bias go to AdamW
    )


def build_optimizer(model: nn.Sequential, ns_dtype=torch.bfloat16) -> MuonAdamW:
    head = model[-1]
    matrices = [m.weight for m in model[1:-1] if isinstance(m, nn.Linear)]
    return MuonAdamW([
        dict(kind="adamw", params=[model[0].weight], lr=0.05),
        dict(kind="adamw", params=[head.weight, head.bias], lr=0.01, weight_decay=0.1),
        dict(kind="muon", params=matrices, lr=0.02),
    ], ns_dtype=ns_dtype)


def fixed_batch(rank: int = 0, world_size: int = 1):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    return x[rows], y[rows]


def train(model, opt, x, y, first_step: int = 0, end_step: int = STEPS) -> None:
    for step in range(first_step, end_step):
        # schedules like the training loop's (a function of the step number), so the tests cover
        # groups being edited between steps
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / 20)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.1 * min(step / 10, 1)
        loss = F.cross_entropy(model(x).view(-1, VOCAB), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(out_dir: str) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1:
        dist.init_process_group("gloo")  # MASTER_ADDR/MASTER_PORT from the environment, as torchrun sets
    ns_dtype = getattr(torch, os.environ.get("NS_DTYPE", "bfloat16"))
    model = build_model()
    opt = build_optimizer(model, ns_dtype)
    train(model, opt, *fixed_batch(rank, world_size))
    torch.save({"params": model.state_dict(), "optim": opt.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    if world_size > 1:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
