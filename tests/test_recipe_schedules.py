"""
Specification of the schedules and the data-derived batch size, weight decay and horizon of
nanochat's 2026 recipe (picochat.training), against values worked out by hand; and that the seed
schedules give what they gave before.

    python -m pytest -q tests/test_recipe_schedules.py     # < 1 s, no GPU needed
"""
import math

import pytest
import torch

from picochat.optim import MuonAdamW
from picochat.training import (auto_total_batch, batch_lr_scale, cosine_weight_decay, horizon_tokens,
                               lr_multiplier_by_step, muon_momentum, muon_momentum_with_warmdown,
                               scaled_weight_decay, set_schedules)

# -----------------------------------------------------------------------------
# LR


def test_seed_lr_schedule_is_unchanged():
    # warmup_ratio 0.1 of 100 steps = 10 steps, warmdown 0.2 = 20 steps to final 0.0
    assert [lr_multiplier_by_step(s, 100, 0.1, 0.2, 0.0) for s in (0, 4, 9, 10, 80, 81, 90, 100)] == \
        [0.1, 0.5, 1.0, 1.0, 1.0, 19 / 20, 10 / 20, 0.0]


def test_lr_warmup_in_steps_then_constant_then_warmdown_to_final_frac():
    # 200 steps, 40 warmup steps, warmdown over the last 0.65 * 200 = 130 steps (from step 70) to 0.05
    lr = [lr_multiplier_by_step(s, 200, 0.0, 0.65, 0.05, warmup_steps=40) for s in range(201)]
    assert lr[0] == 1 / 40 and lr[19] == 20 / 40 and lr[39] == 1.0
    assert all(m == 1.0 for m in lr[39:71])
    assert lr[71] == pytest.approx(129 / 130 + (1 / 130) * 0.05)
    assert lr[135] == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr[200] == pytest.approx(0.05)


def test_lr_warmup_given_both_as_ratio_and_in_steps_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        lr_multiplier_by_step(0, 100, 0.1, 0.2, 0.0, warmup_steps=5)


# -----------------------------------------------------------------------------
# Muon momentum and weight decay


def test_seed_muon_momentum_is_unchanged():
    assert [muon_momentum(s) for s in (0, 150, 300, 5000)] == [0.85, 0.5 * 0.85 + 0.5 * 0.95, 0.95, 0.95]


def test_muon_momentum_rises_to_097_holds_then_falls_to_090_over_the_lr_warmdown():
    # 2000 steps, warmdown 0.65 -> the last 1300 steps (from step 700)
    m = lambda s: muon_momentum_with_warmdown(s, 2000, 0.65)  # noqa: E731
    assert m(0) == 0.85
    assert m(200) == pytest.approx(0.91)
    assert m(400) == m(550) == m(700) == pytest.approx(0.97)
    assert m(1350) == pytest.approx(0.935)
    assert m(2000) == pytest.approx(0.90)


def test_muon_momentum_in_a_run_shorter_than_its_rise_falls_from_where_the_rise_is():
    # 500 steps: the warmdown starts at step 175, while the rise (400 steps) is still going
    rise = 0.85 + 0.12 * 300 / 400
    assert muon_momentum_with_warmdown(300, 500, 0.65) == pytest.approx(rise + (0.90 - rise) * 125 / 325)
    assert muon_momentum_with_warmdown(500, 500, 0.65) == pytest.approx(0.90)


def test_cosine_weight_decay_goes_from_wd_to_zero():
    assert cosine_weight_decay(0, 100, 0.28) == 0.28
    assert cosine_weight_decay(25, 100, 0.28) == pytest.approx(0.14 * (1 + math.sqrt(0.5)))
    assert cosine_weight_decay(50, 100, 0.28) == pytest.approx(0.14)
    assert cosine_weight_decay(100, 100, 0.28) == pytest.approx(0.0)


def test_set_schedules_sets_muon_weight_decay_only_when_given():
    p, q = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02, weight_decay=0.2),
                     dict(kind="adamw", params=[q], lr=0.1, weight_decay=0.01)])
    set_schedules(opt, 0.5, 0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.05]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.01]
    assert opt.param_groups[0]["momentum"] == 0.9
    set_schedules(opt, 0.5, 0.9, muon_weight_decay=0.07)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.01]


# -----------------------------------------------------------------------------
# Batch size, LR and weight decay from the data (vocab 32768, head dim 128, width 64 * depth)


def scaling_params(depth: int) -> tuple[int, int]:
    """(block matrices, lm_head) of nanochat's 2026 model, by hand: 12·L·d² for attention and MLP,
    plus a 12 -> n_head value-embedding gate on every other layer (L/2 of them for even L)."""
    d = 64 * depth
    heads = d // 128
    ve_layers = (depth + 1) // 2
    return 12 * depth * d * d + ve_layers * 12 * heads, 32768 * d


def test_scaling_params_by_hand_match_nanochats_published_counts():
    assert scaling_params(12) == (84_935_088, 25_165_824)
    assert scaling_params(24)[0] == 679_478_976
    assert scaling_params(32)[0] == 1_610_615_808


def horizon(depth: int, ratio: float = 12) -> int:
    return horizon_tokens(ratio, *scaling_params(depth))


def test_the_d12_reference_gets_the_reference_batch_and_weight_decay():
    ref = horizon(12)
    assert ref == 12 * 110_100_912
    assert auto_total_batch(ref, ref) == 2**19
    assert batch_lr_scale(2**19) == 1.0
    assert scaled_weight_decay(2**19, ref, ref) == 0.28


@pytest.mark.parametrize("depth,log2_batch", [(8, 18), (10, 19), (16, 19), (18, 20), (20, 20), (24, 20),
                                              (26, 20), (32, 21), (40, 21), (50, 21)])
def test_auto_batch_by_depth(depth, log2_batch):
    # nanochat: d8 -> 2^18, d10-16 -> 2^19, d18-26 -> 2^20, d32-50 -> 2^21; at ratio 12, and at any
    # other: the reference horizon is d12's at the same ratio, so the ratio cancels
    for ratio in (12, 8):
        assert auto_total_batch(horizon(depth, ratio), horizon(12, ratio)) == 2**log2_batch


@pytest.mark.parametrize("depth,weight_decay", [(20, 0.100), (24, 0.060), (26, 0.047), (32, 0.037)])
def test_weight_decay_by_depth(depth, weight_decay):
    # nanochat's derived values, at its default ratio 12 (again the ratio cancels against the reference's)
    target, ref = horizon(depth), horizon(12)
    batch = auto_total_batch(target, ref)
    assert scaled_weight_decay(batch, target, ref) == pytest.approx(weight_decay, abs=5e-4)


def test_d24_speedrun_horizon_at_ratio_8():
    # nanochat's d24 speedrun: 5.84B tokens at 2^20 tokens per step is 5,568 steps, LR x sqrt(2)
    target = horizon(24, ratio=8)
    batch = auto_total_batch(target, horizon(12, ratio=8))
    assert target == 5_838_484_992 and batch == 2**20 and target // batch == 5568
    assert batch_lr_scale(batch) == pytest.approx(math.sqrt(2))
