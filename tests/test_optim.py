"""
Specification of picochat.optim.MuonAdamW: the AdamW rule is torch.optim.AdamW, the Muon rule makes
near-orthogonal updates, both converge, the fast Newton-Schulz equals the slow reference, resume is
bit-identical, and 2 gloo processes give the 1-process result with each holding only its state shard.

    python -m pytest -q tests/test_optim.py      # ~15 s on 2 CPU cores, no GPU needed
"""
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat.common import PicochatError
from picochat.optim import MuonAdamW, newton_schulz, newton_schulz_reference

sys.path.insert(0, str(Path(__file__).parent))
import _dist_optim_worker as worker  # noqa: E402  (the model, batch and loop both sides of the test share)


# -----------------------------------------------------------------------------
# AdamW

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_match_torch_adamw_for_10_steps(weight_decay):
    torch.manual_seed(0)
    shapes = [(8, 16), (16,), (3, 4, 5)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    opt = MuonAdamW([dict(kind="adamw", params=ours, **hp)])
    ref = torch.optim.AdamW(theirs, **hp)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adamw_on_a_bf16_param_keeps_fp32_moments_and_rounds_only_the_param():
    torch.manual_seed(0)
    p = torch.randn(32, 16).bfloat16().requires_grad_()
    p32 = p.detach().float().requires_grad_()
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=0.01, weight_decay=0.1)])
    ref = torch.optim.AdamW([p32], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    p.grad = torch.randn_like(p)
    p32.grad = p.grad.float()
    opt.step()
    ref.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(p, p32.bfloat16())


# -----------------------------------------------------------------------------
# Muon

@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_first_muon_update_applied_to_the_param_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    p = torch.randn(shape, requires_grad=True)
    before = p.detach().clone()
    lr = 0.02
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr)])
    p.grad = torch.randn_like(p)
    opt.step()
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    update = (before - p.detach()) / (lr * scale)
    s = torch.linalg.svdvals(update)
    # the quintic gives ~U S' V^T with S' in about [0.5, 1.5] (not exactly 1: it trades accuracy for speed)
    assert s.max() / s.min() < 4, s
    assert 0.3 < s.min() and s.max() < 1.7, s


def test_tall_matrix_step_is_sqrt_rows_over_cols_times_its_transposes():
    torch.manual_seed(0)
    grad = torch.randn(64, 32)
    tall = torch.zeros(64, 32, requires_grad=True)
    wide = torch.zeros(32, 64, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[tall, wide], lr=0.02)])
    tall.grad, wide.grad = grad.clone(), grad.T.clone()
    opt.step()
    torch.testing.assert_close(tall.detach(), 2 ** 0.5 * wide.detach().T)


@pytest.mark.parametrize("shape", [(2, 48, 32), (3, 32, 48), (1, 40, 40)])
def test_fast_batched_newton_schulz_matches_reference(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    ref = newton_schulz_reference(G)
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float32), ref, rtol=1e-4, atol=1e-5)
    # the default bf16 run: ~3 significant digits per step, so only close
    assert (newton_schulz(G).float() - ref).abs().max() < 0.05


def test_muon_refuses_params_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=[torch.zeros(8, requires_grad=True)])])


# -----------------------------------------------------------------------------
# Both kinds converge

@pytest.mark.parametrize("kind,lr", [("adamw", 0.05), ("muon", 0.02)])
def test_regression_distance_to_target_halves_within_50_steps(kind, lr):
    torch.manual_seed(0)
    target = torch.randn(32, 64) / 8
    p = torch.zeros(32, 64, requires_grad=True)
    opt = MuonAdamW([dict(kind=kind, params=[p], lr=lr)])
    start = (p - target).norm().item()
    for _ in range(50):
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert (p - target).norm().item() < start / 2


# -----------------------------------------------------------------------------
# Checkpointing

def _train(model, opt, first_step, end_step):
    worker.train(model, opt, *worker.fixed_batch(), first_step, end_step)


def test_resume_after_save_and_load_matches_uninterrupted_run_bit_for_bit():
    # bf16 params: their fp32 moments and momentum buffers must come back as fp32, not rounded
    straight = worker.build_model().bfloat16()
    _train(straight, worker.build_optimizer(straight), 0, 6)

    first = worker.build_model().bfloat16()
    opt = worker.build_optimizer(first)
    _train(first, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = worker.build_model().bfloat16()
    resumed.load_state_dict(ckpt["model"])
    opt = worker.build_optimizer(resumed)
    opt.load_state_dict(ckpt["optim"])
    assert opt.state[resumed[0].weight]["exp_avg"].dtype == torch.float32
    assert opt.state[resumed[1].weight]["momentum_buffer"].dtype == torch.float32
    _train(resumed, opt, 3, 6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -----------------------------------------------------------------------------
# Distributed: 2 gloo processes on this machine

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_and_each_holds_only_its_shard(tmp_path):
    # NS in fp32 on both sides: in bf16 a 1-ulp difference in the averaged gradient could flip a rounding
    # and move a weight by ~1e-5, more than the tolerance this test wants to hold
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               NS_DTYPE="float32", PYTHONPATH=str(Path(__file__).parents[1]))
    script = str(Path(__file__).parent / "_dist_optim_worker.py")
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for r, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"rank {r} failed:\n{out}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = worker.build_model()
    opt = worker.build_optimizer(model, ns_dtype=torch.float32)
    _train(model, opt, 0, worker.STEPS)
    for name, p in model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["params"][name], p, rtol=0, atol=1e-5, msg=f"rank {r} {name}")

    # the state is split: each rank holds some params' state, no param's state is held twice
    owned = [set(ranks[r]["optim"]["state"]) for r in range(2)]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(opt.state_dict()["state"])

    with pytest.raises(PicochatError, match="saved with world size 2, now 1; resume with the same number"):
        opt.load_state_dict(ranks[0]["optim"])
