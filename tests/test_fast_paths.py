"""Each fast autograd Function in picochat/ops.py agrees with its slow, obvious reference:
forward values and input gradients, in fp32 (tight) and in bf16 (no less accurate than the
reference computed in bf16, both measured against an fp64 ground truth)."""
import pytest
import torch

import picochat.ops as M
from picochat.model import GPT, GPTConfig
from picochat.ops import head_loss, reference_head_loss

B, T, H, D = 3, 17, 2, 16  # odd sizes on purpose


def rotary_args(dtype):
    inv_freq = 10_000.0 ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)  # as in GPT
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    return angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)


CASES = {  # name: (fast, reference, input shape, extra args builder)
    "norm": (M.norm, M.reference_norm, (B, T, 48), lambda dtype: ()),
    "rotary_norm": (M.rotary_norm, M.reference_rotary_norm, (B, T, H, D), rotary_args),
    "relu_squared": (M.relu_squared, M.reference_relu_squared, (B, T, 64), lambda dtype: ()),
}


def run(fn, x, grad, extra):
    x = x.detach().clone().requires_grad_()
    y = fn(x, *extra)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y.double(), gx.double()


@pytest.mark.parametrize("name", CASES)
def test_fast_path_matches_reference_in_fp32(name):
    # Tolerance 1e-5: the two differ only in the order of fp32 operations.
    fast, ref, shape, extra = CASES[name]
    torch.manual_seed(0)
    x, grad = torch.randn(shape), torch.randn(shape)
    y, gx = run(fast, x, grad, extra(torch.float32))
    y_ref, gx_ref = run(ref, x, grad, extra(torch.float32))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_fast_path_in_bf16_is_as_accurate_as_the_reference_in_bf16(name):
    # Both bf16 paths against an fp64 ground truth: the fast one's max error may be at most twice the
    # reference's (it rounds the 1/rms scale and the mean(g·y) term to bf16), plus one bf16 ulp at 1.
    fast, ref, shape, extra = CASES[name]
    torch.manual_seed(0)
    x, grad = torch.randn(shape), torch.randn(shape)
    truth = run(ref, x.double(), grad.double(), extra(torch.float64))
    bf = [x.bfloat16(), grad.bfloat16(), extra(torch.bfloat16)]
    for what, got, ref_got, want in zip(("forward", "gradient"), run(fast, *bf), run(ref, *bf), truth):
        err_fast, err_ref = (got - want).abs().max().item(), (ref_got - want).abs().max().item()
        assert err_fast <= 2 * err_ref + 2 ** -8, f"{name} {what}: error {err_fast:.3g} vs reference {err_ref:.3g}"


def use_reference_paths(monkeypatch):
    import picochat.model  # the model looks these up in its own namespace at call time
    for name in ("norm", "rotary_norm", "relu_squared"):
        monkeypatch.setattr(picochat.model, name, getattr(M, f"reference_{name}"))


def test_model_loss_and_gradients_match_the_all_reference_model(monkeypatch):
    # The whole training step's loss and every parameter gradient, fast paths vs references, fp32.
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # zero-init projections would hide the blocks; perturb every weight
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model.trunk(idx), model.lm_head.weight, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast_loss, fast_grads = loss_and_grads(head_loss)
    use_reference_paths(monkeypatch)
    ref_loss, ref_grads = loss_and_grads(reference_head_loss)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
