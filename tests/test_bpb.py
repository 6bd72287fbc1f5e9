"""Bits per byte: the formula on hand-made numbers, special tokens and ignored targets left out, and
the same value whether one process scores every batch or two gloo ranks score half each."""
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat.common import shutdown_distributed
from picochat.evals.bpb import evaluate_bpb

# Token 0 is special (0 bytes); tokens 1, 2, 3 stand for 1, 2 and 4 bytes of text.
TOKEN_BYTES = torch.tensor([0, 1, 2, 4])


def nats_of(inputs, targets):
    """A stub 'model': every target costs nats, (t + 1)/10 for target t (inputs are ignored)."""
    return (targets.clamp(min=0).double() + 1) / 10


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(6):
        targets = torch.randint(0, 4, (2, 5), generator=g)
        targets[0, 0] = -1  # an ignored target
        out.append((targets, targets))
    return out


def hand_computed() -> float:
    nats = nbytes = 0.0
    for _, targets in batches():
        for t in targets.flatten().tolist():
            if t > 0:  # special token 0 and ignored -1 count neither nats nor bytes
                nats += (t + 1) / 10
                nbytes += int(TOKEN_BYTES[t])
    return nats / (math.log(2) * nbytes)


def test_bpb_counts_only_text_tokens_and_divides_by_their_bytes():
    assert math.isclose(evaluate_bpb(nats_of, batches(), TOKEN_BYTES), hand_computed(), rel_tol=1e-12)


def test_bpb_of_only_special_tokens_is_infinite_not_a_division_error():
    only_special = [(torch.zeros(1, 3, dtype=torch.long),) * 2]
    assert evaluate_bpb(nats_of, only_special, TOKEN_BYTES) == float("inf")


def _rank_main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = batches()[rank::world]  # strided, as the loaders' streams are
        out[rank] = evaluate_bpb(nats_of, mine, TOKEN_BYTES)
    finally:
        shutdown_distributed()


def test_two_ranks_scoring_half_each_agree_with_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
    assert out[0] == out[1]  # all-reduced: every rank reports the same number
    assert math.isclose(out[0], hand_computed(), rel_tol=1e-12)
