"""
picochat/fp8.py on the CPU: the scaling math (amax, scales, saturation, round trip), the FP8
matmul against its fp32 reference and within FP8 tolerance of bf16, the operands laid out as
`torch._scaled_mm` demands on CUDA, which Linears switch, evaluation in bf16 under fp8_disabled,
and one compiled graph. torch's CPU build has a (slow) float8 `_scaled_mm`; where a build lacks
it the matmul tests are skipped. gpu_check's `fp8` check runs the same comparisons on a GPU.

    pytest -q tests/test_fp8.py
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo

from picochat.fp8 import (E4M3, E5M2, Float8Linear, Float8Matmul, enable_fp8, fp8_disabled, fp8_support,
                          reference_fp8_linear, saturated_cast, to_fp8)
from picochat.model import GPT, Linear, config_from_depth
from picochat.ops import head_loss
from picochat.recipe import model_parts


def cpu_scaled_mm_works() -> bool:
    one = torch.ones((), dtype=torch.float32)
    try:
        a = torch.zeros(16, 16, dtype=E4M3)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


needs_scaled_mm = pytest.mark.skipif(not cpu_scaled_mm_works(), reason="this torch has no CPU float8 _scaled_mm")


def rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative error of a whole tensor: ‖got − truth‖ / ‖truth‖."""
    return ((got.double() - truth).norm() / truth.norm()).item()


def tiny_model(seed: int = 0, parts: dict | None = None, dtype=torch.bfloat16) -> GPT:
    """Width 128 (two heads of 64): the smallest model whose block matrices qualify for FP8."""
    config = config_from_depth(2, vocab_size=512, sequence_len=64, head_dim=64, **(parts or {}))
    model = GPT(config, compute_dtype=dtype)
    model.init_weights(seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # zero-init projections make blocks the identity; perturb them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# --- the scaling math -------------------------------------------------------------------

def test_fp8_support_says_why_not_on_a_cpu():
    ok, why = fp8_support("cpu")
    assert not ok
    assert why == "FP8 needs an H100/Ada GPU (compute capability 8.9+); this is cpu"


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_the_scale_maps_the_largest_magnitude_onto_the_formats_max(dtype):
    t = torch.randn(64, 48) * 3.0
    t[5, 7] = -40.0  # the amax is a negative value's magnitude
    q, inv_scale = to_fp8(t, dtype)
    top = torch.finfo(dtype).max
    assert q.dtype == dtype and inv_scale.dtype == torch.float32 and inv_scale.numel() == 1
    assert inv_scale.item() == pytest.approx(40.0 / top, rel=1e-6)
    assert q[5, 7].float().item() == -top
    assert q.float().abs().max().item() == top


def test_values_past_the_formats_max_saturate_instead_of_becoming_nan():
    # A plain cast is not to be relied on: e4m3fn has no infinity, and torch's scalar conversion
    # turns 480 and above into NaN where this CPU build's tensor cast happens to saturate.
    t = torch.tensor([449.0, -1e6, 1e30, 3.0])
    assert saturated_cast(t, E4M3).float().tolist() == [448.0, -448.0, 448.0, 3.0]
    assert saturated_cast(t, E5M2).float().tolist() == [448.0, -57344.0, 57344.0, 3.0]


def test_an_all_zero_tensor_quantizes_to_zeros_with_a_finite_scale():
    q, inv_scale = to_fp8(torch.zeros(32, 32), E4M3)
    assert torch.isfinite(inv_scale) and inv_scale > 0
    assert not q.float().any()


@pytest.mark.parametrize("dtype, mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_the_round_trip_is_within_the_formats_rounding(dtype, mantissa_bits):
    # magnitudes within 2^-5 of the amax: all inside the format's normal range, where rounding to
    # the nearest of 2^m steps per power of two errs by at most half a step, 2^-(m+1) relative
    t = torch.empty(4096).uniform_(1 / 32, 1) * torch.randn(4096).sign()
    t[0] = 1.0
    q, inv_scale = to_fp8(t, dtype)
    back = q.float() * inv_scale
    assert ((back - t).abs() / t.abs()).max().item() <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-6)


# --- the matmul -----------------------------------------------------------------------

def operands(M=256, K=384, N=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).bfloat16()
    w = torch.randn(N, K, generator=gen) * K ** -0.5  # the fp32 master weight
    g = torch.randn(M, N, generator=gen).bfloat16()
    return x, w, g


def fp8_forward_backward(x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = Float8Matmul.apply(x, w)
    y.backward(g)
    return y, x.grad, w.grad


@needs_scaled_mm
def test_the_fp8_matmul_equals_its_fp32_reference():
    x, w, _ = operands()
    got, want = Float8Matmul.apply(x, w), reference_fp8_linear(x, w)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= ulp  # only the summation order differs


@needs_scaled_mm
def test_forward_and_gradients_are_within_fp8_tolerance_of_bf16():
    x, w, g = operands()
    y, gx, gw = fp8_forward_backward(x, w, g)
    assert (y.dtype, gx.dtype, gw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    x64, w64, g64 = x.double(), w.double(), g.double()
    truth = (x64 @ w64.t(), g64 @ w64, g64.t() @ x64)
    bf16 = (x @ w.bfloat16().t(), g @ w.bfloat16(), g.t() @ x)
    # Gaussian operands, per-element rounding of 2^-4 (e4m3) and 2^-3 (e5m2) at most: measured
    # 0.038 forward and 0.059 for both gradients; bf16 is ~0.002. A wrong scale errs by O(1).
    for name, got, ref, t, tol in zip(("output", "input grad", "weight grad"), (y, gx, gw), bf16, truth,
                                      (0.06, 0.09, 0.09)):
        assert rel(ref, t) < 0.01, name
        assert rel(got, t) < tol, f"{name}: FP8 relative error {rel(got, t):.3f} (bf16 {rel(ref, t):.4f})"


@needs_scaled_mm
def test_operands_meet_the_layout_scaled_mm_demands_on_cuda(monkeypatch):
    """On CUDA the first operand must be row-major and the second column-major, every dimension a
    multiple of 16, the scales single fp32 values, and not both operands e5m2; the CPU kernel
    accepts more, so a wrapper checks what the GPU would refuse."""
    real, calls = torch._scaled_mm, []

    def checked(a, b, *, scale_a, scale_b, out_dtype, use_fast_accum=False):
        assert a.dim() == b.dim() == 2 and a.size(1) == b.size(0)
        assert a.stride(1) == 1 and a.stride(0) == a.size(1), f"first operand not row-major: {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) == b.size(0), f"second operand not column-major: {b.stride()}"
        assert all(d % 16 == 0 for d in (*a.shape, b.size(1))), (a.shape, b.shape)
        assert {a.dtype, b.dtype} <= {E4M3, E5M2} and (a.dtype, b.dtype) != (E5M2, E5M2)
        for s in (scale_a, scale_b):
            assert s.dtype == torch.float32 and s.numel() == 1
        calls.append((a.dtype, b.dtype, out_dtype, use_fast_accum))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    fp8_forward_backward(*operands())
    assert calls == [(E4M3, E4M3, torch.bfloat16, True),  # forward: fast accumulation
                     (E5M2, E4M3, torch.bfloat16, False),  # input gradient
                     (E5M2, E4M3, torch.float32, False)]  # weight gradient, in the master's dtype


@needs_scaled_mm
def test_rows_not_a_multiple_of_16_take_the_bf16_path():
    model = tiny_model()
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(1, 3, 128).bfloat16()  # a decode step's rows
    want = layer(x)
    enable_fp8(model)
    assert torch.equal(layer(x), want)
    x16 = torch.randn(1, 16, 128).bfloat16()
    assert not torch.equal(layer(x16), Linear.forward(layer, x16))  # 16 rows: the FP8 path


# --- switching a model ----------------------------------------------------------------

def test_enable_fp8_switches_the_block_matrices_and_keeps_head_embeddings_and_gates():
    model = tiny_model(parts=model_parts("2026", 64))  # value embeddings, smear: every gate there is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    matmul_params = model.matmul_params()
    assert enable_fp8(model) == 6 * 2  # q, k, v, attention out, MLP in and out, per layer
    switched = {name for name, m in model.named_modules() if type(m) is Float8Linear}
    assert switched == {f"transformer.h.{i}.{n}" for i in range(2) for n in
                        ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert type(model.lm_head) is Linear and type(model.smear_gate) is Linear
    assert type(model.transformer.h[1].attn.ve_gate) is Linear
    assert type(model.transformer.wte) is torch.nn.Embedding
    # the same parameters: checkpoints, the optimizer and FLOP counting see no difference
    assert model.matmul_params() == matmul_params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert enable_fp8(model) == 0  # already switched


def test_a_model_too_narrow_for_fp8_switches_nothing():
    model = GPT(config_from_depth(1, vocab_size=512, sequence_len=64, aspect_ratio=64, head_dim=64))
    assert enable_fp8(model) == 0  # width 64: below the 128 the rule asks for


@needs_scaled_mm
def test_fp8_disabled_runs_the_bf16_forward_and_switches_back():
    model = tiny_model()
    plain = copy.deepcopy(model)
    enable_fp8(model)
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    want = plain(idx)
    assert not torch.equal(model(idx), want)  # FP8 rounds differently
    with fp8_disabled(model):
        assert torch.equal(model(idx), want)
    assert sum(type(m) is Float8Linear for m in model.modules()) == 12
    with pytest.raises(KeyError), fp8_disabled(model):
        raise KeyError("an evaluation that fails")
    assert sum(type(m) is Float8Linear for m in model.modules()) == 12


@needs_scaled_mm
def test_a_model_trains_with_fp8_as_it_does_in_bf16():
    losses = {}
    for fp8 in (False, True):
        model = tiny_model(seed=3)
        if fp8:
            enable_fp8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(4)
        data = torch.randint(0, 64, (4, 65), generator=gen)  # a small alphabet: learnable in a few steps
        for _ in range(8):
            loss = head_loss(model.trunk(data[:, :-1]), model.lm_head.weight, data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses[fp8] = loss.item()
        assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    assert losses[True] < 5.5 and abs(losses[True] - losses[False]) < 0.05 * losses[False], losses


@needs_scaled_mm
def test_the_compiled_fp8_trunk_is_one_graph_and_computes_the_eager_result():
    # In fp32 activations: in bf16 the traced graph already rounds ~1% apart from eager, and FP8
    # turns that into whole e4m3 steps, which would hide a real difference.
    dynamo.reset()
    model = tiny_model(dtype=torch.float32)
    enable_fp8(model)
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    explained = dynamo.explain(model.trunk)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    dynamo.reset()
    compiled = torch.compile(model.trunk, backend="aot_eager", fullgraph=True)
    grads, r = [], torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(3))
    for fn in (model.trunk, compiled):
        out = fn(idx)
        (out * r).sum().backward()  # a random direction: the output is normalized, its square sum fixed
        grads.append((out.detach(), model.transformer.h[0].attn.c_q.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    (eager_out, eager_grad), (comp_out, comp_grad) = grads
    assert rel(comp_out, eager_out.double()) < 1e-4
    assert rel(comp_grad, eager_grad.double()) < 1e-4
