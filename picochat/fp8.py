"""
FP8 training matmuls for GPUs that have them (H100, H200, Ada: compute capability 8.9+).

    from picochat.fp8 import enable_fp8, fp8_disabled, fp8_support
    ok, why = fp8_support(device)      # (False, "FP8 needs an H100/Ada GPU ...; this is cpu")
    if ok:
        n = enable_fp8(model)          # before torch.compile; returns how many Linears now use FP8
    ...
    with fp8_disabled(model):          # evaluation and sampling in the compute dtype (bf16)
        evaluate(model)

The recipe is "tensorwise" dynamic scaling, as torchao calls it and nanochat HEAD trains with
(its log: 1.17x tok/s at d26, ≈5% less time to GPT-2 at equal quality): each matmul operand gets
one fp32 scale, recomputed every call, that maps the tensor's largest |value| onto the FP8
format's largest finite value. Inputs and weights are cast to e4m3 (more mantissa), gradients to
e5m2 (more range). The three matmuls of a Linear (output, input gradient, weight gradient) run
as `torch._scaled_mm` with fp32 accumulation; only the forward one uses the tensor cores' fast
(less precise) accumulation, as torchao does. The backward saves the FP8 copies of the input and
weight, not the bf16 ones.

What stays in the compute dtype: the head (its loss is fused and chunked in model.py and never
calls the Linear), the embeddings, the small gates (value-embedding and smear gates: 12 and 24
inputs), every Linear whose sides are not multiples of 16 or smaller than 128 (too small to gain),
and any call whose rows are not a multiple of 16 (`_scaled_mm` needs every dimension to be; a
decode step has one row per sequence).

How: `enable_fp8` swaps the class of the eligible `picochat.model.Linear` modules to
`Float8Linear`, a subclass that keeps the same fp32 master weight (so state dicts, checkpoints,
the optimizer and FLOP counting see no difference) and only changes forward. `fp8_disabled`
swaps them back for the duration of a `with` block. With torch.compile, the first call in each
mode compiles its own graph once.

`reference_fp8_linear` is the slow twin: the same quantize-dequantize in fp32 and a plain matmul;
tests/test_fp8.py checks the fast path against it and against bf16, and that the operands meet
the layout `_scaled_mm` demands on CUDA (the CPU build is lenient about it).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from picochat.model import Linear

E4M3 = torch.float8_e4m3fn  # inputs and weights: 3 mantissa bits, largest finite value 448
E5M2 = torch.float8_e5m2  # gradients: 2 mantissa bits, largest finite value 57,344
AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale (its FP8 copy is zeros either way)
KEEP_DTYPE = ("lm_head", "ve_gate", "smear_gate")  # module names never switched (see the docstring)
MIN_SIDE, MULTIPLE = 128, 16  # nanochat HEAD's eligibility rule; _scaled_mm needs multiples of 16


def fp8_support(device) -> tuple[bool, str]:
    """(True, what) where FP8 matmuls can run on `device`, else (False, one line saying why)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"FP8 needs an H100/Ada GPU (compute capability 8.9+); this is {device.type}"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"FP8 needs torch._scaled_mm, which torch {torch.__version__} does not have"
    if not torch.cuda.is_available():
        return False, f"FP8 needs a CUDA GPU, and torch {torch.__version__} sees none"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return False, f"FP8 needs an H100/Ada GPU (compute capability 8.9+); {name} is {major}.{minor}"
    return True, f"FP8 matmuls on {name} (compute capability {major}.{minor})"


# -----------------------------------------------------------------------------
# Scaling and casting

def saturated_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, values beyond its largest finite value clamped to it: e4m3fn has no infinity,
    torch's scalar conversion makes NaN of anything from 480 up, and the scaled maximum can round
    just past the format's max."""
    top = torch.finfo(dtype).max
    return t.clamp(-top, top).to(dtype)


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t·s in `dtype`, 1/s): s = the format's max / max|t|, one fp32 scale for the whole tensor.
    The FP8 copy times 1/s is t within the format's rounding (2^-4 relative for e4m3, 2^-3 for
    e5m2, for values within its normal range)."""
    amax = t.detach().abs().max().float()
    scale = torch.finfo(dtype).max / amax.clamp(min=AMAX_FLOOR)
    return saturated_cast(t.float() * scale, dtype), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column by column: what _scaled_mm wants of its second operand."""
    return t.t().contiguous().t()


# -----------------------------------------------------------------------------
# The matmul

@torch._dynamo.allow_in_graph  # compiled as one opaque node: dynamo does not trace into it
class Float8Matmul(torch.autograd.Function):
    """y = x @ wᵀ for x (M, K) in the compute dtype and w (N, K) the fp32 master weight, every
    matmul in FP8. Returns y in x's dtype; the weight's gradient comes back in w's dtype."""

    @staticmethod
    def forward(ctx, x, w):
        x8, x_inv = to_fp8(x.contiguous(), E4M3)
        w8, w_inv = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, w.dtype)
        # w8ᵀ (K, N) is column-major as it is: a transposed view of the row-major weight
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_fp8(grad.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K), accumulated into the fp32 master's dtype
            grad_w = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                      out_dtype=w_dtype)
        return grad_x, grad_w


def reference_fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The forward of Float8Matmul, the obvious way: each operand quantized, dequantized to fp32,
    multiplied in fp32, rounded to x's dtype."""
    x8, x_inv = to_fp8(x, E4M3)
    w8, w_inv = to_fp8(w, E4M3)
    return ((x8.float() * x_inv) @ (w8.float() * w_inv).t()).to(x.dtype)


class Float8Linear(Linear):
    """picochat's Linear with its matmuls in FP8 (made by enable_fp8, never constructed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if rows % MULTIPLE:  # _scaled_mm needs every dimension a multiple of 16: the bf16 path
            return super().forward(x)
        y = Float8Matmul.apply(x.reshape(rows, x.size(-1)), self.weight)
        return y.view(*x.shape[:-1], y.size(-1))


# -----------------------------------------------------------------------------
# Switching a model

def eligible(name: str, module: nn.Module) -> bool:
    """A Linear worth FP8: both sides multiples of 16, the smaller at least 128, not one of
    KEEP_DTYPE."""
    if type(module) is not Linear or name.rsplit(".", 1)[-1] in KEEP_DTYPE:
        return False
    n, k = module.weight.shape
    return n % MULTIPLE == 0 and k % MULTIPLE == 0 and min(n, k) >= MIN_SIDE


def enable_fp8(model: nn.Module) -> int:
    """Switch every eligible Linear of `model` to FP8 matmuls, in place; returns how many. Call it
    before torch.compile, after asking fp8_support (this does not look at the device: on a CPU the
    same math runs through torch's slow reference _scaled_mm, which the tests use)."""
    switched = 0
    for name, module in model.named_modules():
        if eligible(name, module):
            module.__class__ = Float8Linear
            switched += 1
    return switched


@contextmanager
def fp8_disabled(model: nn.Module):
    """Run `model`'s FP8 Linears in the compute dtype inside the block (evaluation, sampling), and
    switch them back afterwards, also when the block raises. Does nothing to a model without FP8."""
    switched = [m for m in model.modules() if type(m) is Float8Linear]
    for m in switched:
        m.__class__ = Linear
    try:
        yield model
    finally:
        for m in switched:
            m.__class__ = Float8Linear
