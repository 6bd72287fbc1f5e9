"""
Specification of picochat.optim.MuonAdamW: the AdamW rule is torch.optim.AdamW, the Muon rule makes
near-orthogonal updates, both converge, the fast Newton-Schulz and Polar Express equal their slow
references, the muon options of nanochat's 2026 recipe (Polar Express, NorMuon, cautious weight
decay, MuonEq) follow their formulas written out by hand while the defaults stay the seed rule bit for
bit, resume is bit-identical, and 2 gloo processes give the 1-process result with each holding only
its state shard.

    python -m pytest -q tests/test_optim.py      # ~25 s on 2 CPU cores, no GPU needed
"""
import io
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat.common import PicochatError
from picochat.optim import (PE_COEFFS, MuonAdamW, newton_schulz, newton_schulz_reference, normuon,
                            polar_express, polar_express_reference, row_equilibrate)

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


@pytest.mark.parametrize("group,message", [(dict(ortho="svd"), "ortho must be one of"),
                                           (dict(ortho="polar_express", ns_steps=6), "coefficients for 5 steps")])
def test_muon_refuses_options_it_does_not_have(group, message):
    with pytest.raises(ValueError, match=message):
        MuonAdamW([dict(kind="muon", params=[torch.zeros(8, 8, requires_grad=True)], **group)])


# -----------------------------------------------------------------------------
# The seed rule is the default, bit for bit

def seed_muon_steps(params, grads_per_step, lr=0.02, momentum=0.95):
    """The Muon update as it was before the 2026 options, copied here so the default cannot drift:
    Nesterov momentum per matrix, one bf16 Newton-Schulz per same-shape stack, then the scaled step."""
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for shape in dict.fromkeys(p.shape for p in params):
            idx = [i for i, p in enumerate(params) if p.shape == shape]
            updates = []
            for i in idx:
                bufs[i].lerp_(grads[i], 1 - momentum)
                updates.append(grads[i].lerp(bufs[i], momentum))
            ortho = newton_schulz(torch.stack(updates), 5, torch.bfloat16)
            for i, u in zip(idx, ortho):
                params[i].add_(u.float(), alpha=-lr * math.sqrt(max(1.0, shape[0] / shape[1])))
    return params


SHAPES = [(24, 12), (12, 24), (16, 16), (16, 16)]


def _random_grads(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("explicit", [{}, dict(ortho="newton_schulz", normuon=False, beta2=0.9, weight_decay=0.0,
                                               row_equilibrate=False)])
def test_default_muon_options_give_the_seed_update_bit_for_bit(explicit):
    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    grads = _random_grads(4)
    expected = seed_muon_steps([p.clone() for p in start], grads)
    params = [p.clone().requires_grad_() for p in start]
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.02, **explicit)])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in params)


# -----------------------------------------------------------------------------
# The 2026 options

@pytest.mark.parametrize("shape", [(2, 48, 32), (3, 32, 48), (1, 40, 40)])
def test_fast_batched_polar_express_matches_reference(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    ref = polar_express_reference(G)
    torch.testing.assert_close(polar_express(G, dtype=torch.float32), ref, rtol=1e-4, atol=1e-5)
    assert (polar_express(G).float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (48, 48)])
def test_polar_express_lands_singular_values_nearer_one_than_newton_schulz(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    pe = torch.linalg.svdvals(polar_express(G).float())
    ns = torch.linalg.svdvals(newton_schulz(G).float())
    assert 0.8 < pe.min() and pe.max() < 1.2, pe
    assert pe.min() > ns.min() + 0.1


def test_row_equilibrate_gives_every_row_the_mean_row_norm_and_keeps_zero_rows():
    U = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]])  # row norms 5, 1, 0: mean 2
    torch.testing.assert_close(row_equilibrate(U), torch.tensor([[[1.2, 1.6], [0.0, 2.0], [0.0, 0.0]]]))


def normuon_by_hand(u, v, beta2, eps=1e-10):
    """One matrix, one row (or, if wide, column) at a time."""
    rows, cols = u.shape
    lines = [u[i, :] for i in range(rows)] if rows >= cols else [u[:, j] for j in range(cols)]
    new_v = [beta2 * v.flatten()[i] + (1 - beta2) * (line ** 2).mean() for i, line in enumerate(lines)]
    scaled = [line / torch.sqrt(v_i + eps) for line, v_i in zip(lines, new_v)]
    out = torch.stack(scaled) if rows >= cols else torch.stack(scaled, dim=1)
    out = out * torch.sqrt((u ** 2).sum()) / torch.sqrt((out ** 2).sum())
    return out, torch.stack(new_v).reshape(v.shape)


@pytest.mark.parametrize("shape,v_shape", [((12, 6), (12, 1)), ((8, 8), (8, 1)), ((6, 12), (1, 12))])
def test_normuon_matches_a_plain_loop_over_rows_or_columns(shape, v_shape):
    torch.manual_seed(0)
    U = torch.randn(2, *shape) * torch.rand(2, *shape)  # uneven rows and columns
    v = torch.rand(2, *v_shape) / 10
    got_u, got_v = normuon(U, v, 0.9)
    for k in range(2):
        u, new_v = normuon_by_hand(U[k], v[k], 0.9)
        torch.testing.assert_close(got_u[k], u)
        torch.testing.assert_close(got_v[k], new_v)
        torch.testing.assert_close(got_u[k].norm(), U[k].norm())  # only the balance changes


def test_cautious_weight_decay_on_a_2x2_matrix_by_hand():
    # gradient diag(1, -1): Newton-Schulz keeps it diagonal, diag(s, -s), with s from the scalar quintic
    p = torch.tensor([[-0.5, 0.4], [0.2, 0.3]], requires_grad=True)
    p.grad = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    lr, wd = 0.1, 0.5
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=0.0, nesterov=False, weight_decay=wd)],
                    ns_dtype=torch.float32)
    opt.step()
    s = 1 / (math.sqrt(2) + 1e-7)
    for _ in range(5):
        s = 3.4445 * s - 4.7750 * s ** 3 + 2.0315 * s ** 5
    # u = diag(s, -s), so u*p = [[-0.5s, 0], [0, -0.3s]]: the diagonal entries move away from zero
    # (not decayed); the off-diagonal products are 0, and 0 >= 0 is decayed
    expected = torch.tensor([[-0.5 - lr * s, 0.4 * (1 - lr * wd)],
                             [0.2 * (1 - lr * wd), 0.3 + lr * s]])
    torch.testing.assert_close(p.detach(), expected)


def all_options_by_hand(params, grads_per_step, lr, momentum, wd, beta2=0.9):
    """MuonEq, Polar Express, NorMuon and cautious weight decay written out for one matrix at a time."""
    bufs = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros(p.shape[0], 1) if p.shape[0] >= p.shape[1] else torch.zeros(1, p.shape[1]) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * bufs[i]  # Nesterov
            norms = u.norm(dim=1, keepdim=True)
            u = u * norms.mean() / norms
            u = polar_express_reference(u)
            u, vs[i] = normuon_by_hand(u, vs[i], beta2)
            step_lr = lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            params[i] = p - step_lr * u - step_lr * wd * p * (u * p >= 0)
    return params


def test_all_2026_options_for_4_steps_match_the_formulas_written_out_by_hand():
    torch.manual_seed(0)
    start = [torch.randn(s) / 4 for s in SHAPES]
    grads = _random_grads(4)
    expected = all_options_by_hand([p.clone() for p in start], grads, lr=0.02, momentum=0.95, wd=0.5)
    params = [p.clone().requires_grad_() for p in start]
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.02, ortho="polar_express", normuon=True,
                          weight_decay=0.5, row_equilibrate=True)], ns_dtype=torch.float32)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5)
    assert [tuple(opt.state[p]["second_moment"].shape) for p in params] == [(24, 1), (1, 24), (16, 1), (16, 1)]


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


# every muon option of nanochat's 2026 recipe on, and a state entry (NorMuon's) the seed rule does not have
RECIPE_2026 = dict(ortho="polar_express", normuon=True, weight_decay=0.1, row_equilibrate=True)


def _optimizer(model, muon_options, ns_dtype=torch.bfloat16):
    opt = worker.build_optimizer(model, ns_dtype)
    opt.param_groups[-1].update(muon_options)
    return opt


@pytest.mark.parametrize("muon_options", [{}, RECIPE_2026], ids=["seed", "2026"])
def test_resume_after_save_and_load_matches_uninterrupted_run_bit_for_bit(muon_options):
    # bf16 params: their fp32 moments and momentum buffers must come back as fp32, not rounded
    straight = worker.build_model().bfloat16()
    _train(straight, _optimizer(straight, muon_options), 0, 6)

    first = worker.build_model().bfloat16()
    opt = _optimizer(first, muon_options)
    _train(first, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = worker.build_model().bfloat16()
    resumed.load_state_dict(ckpt["model"])
    opt = _optimizer(resumed, muon_options)
    opt.load_state_dict(ckpt["optim"])
    assert opt.state[resumed[0].weight]["exp_avg"].dtype == torch.float32
    assert opt.state[resumed[1].weight]["momentum_buffer"].dtype == torch.float32
    if muon_options.get("normuon"):
        assert opt.state[resumed[1].weight]["second_moment"].dtype == torch.float32
    _train(resumed, opt, 3, 6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -----------------------------------------------------------------------------
# Distributed: 2 gloo processes on this machine

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# runs the worker with its muon group's options changed (argv: OUT_DIR, options as a Python literal)
WORKER_WITH_OPTIONS = """
import ast, sys
import _dist_optim_worker as worker
build, options = worker.build_optimizer, ast.literal_eval(sys.argv[2])
def build_with_options(model, ns_dtype):
    opt = build(model, ns_dtype)
    opt.param_groups[-1].update(options)
    return opt
worker.build_optimizer = build_with_options
worker.main(sys.argv[1])
"""


@pytest.mark.parametrize("muon_options", [{}, RECIPE_2026], ids=["seed", "2026"])
def test_two_gloo_ranks_match_one_process_and_each_holds_only_its_shard(tmp_path, muon_options):
    # NS in fp32 on both sides: in bf16 a 1-ulp difference in the averaged gradient could flip a rounding
    # and move a weight by ~1e-5, more than the tolerance this test wants to hold
    tests = Path(__file__).parent
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               NS_DTYPE="float32", PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    command = [str(tests / "_dist_optim_worker.py"), str(tmp_path)] if not muon_options else \
        ["-c", WORKER_WITH_OPTIONS, str(tmp_path), repr(muon_options)]
    procs = [subprocess.Popen([sys.executable, *command], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for r, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"rank {r} failed:\n{out}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = worker.build_model()
    opt = _optimizer(model, muon_options, ns_dtype=torch.float32)
    _train(model, opt, 0, worker.STEPS)
    for name, p in model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["params"][name], p, rtol=0, atol=1e-5, msg=f"rank {r} {name}")

    # the state is split: each rank holds some params' state, no param's state is held twice
    owned = [set(ranks[r]["optim"]["state"]) for r in range(2)]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(opt.state_dict()["state"])
    if muon_options.get("normuon"):
        assert any("second_moment" in st for r in range(2) for st in ranks[r]["optim"]["state"].values())

    with pytest.raises(PicochatError, match="saved with world size 2, now 1; resume with the same number"):
        opt.load_state_dict(ranks[0]["optim"])
