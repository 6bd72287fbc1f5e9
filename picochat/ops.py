"""
The elementwise ops around the model's matmuls and the fused head loss, each fast path with its
plain reference beside it (tests/test_fast_paths.py pins them together; benchmarks/train_throughput.py
times both). picochat/model.py builds the GPT from them.

- `norm`: RMSNorm over the last dim, no learnable gain; `rotary_norm`: RoPE, then QK-norm;
  `relu_squared`: the MLP's activation. Under torch.compile the references are traced instead.
- `head_loss`: the head, softcap and cross-entropy in row chunks, never holding (rows, V) logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOFTCAP = 15.0  # logits = 15·tanh(logits/15) (docs/DESIGN.md#model)


def reference_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable gain: the model keeps no norm parameters at all."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector; x is (B, T, H, D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def reference_rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """QK-norm after RoPE, the obvious way."""
    return reference_norm(apply_rotary(x, cos, sin))


def reference_relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


# --- Fast paths -------------------------------------------------------------------------------
# The elementwise ops around the matmuls cost as much as the matmuls on a CPU, mostly in extra
# passes over memory (F.rms_norm upcasts bf16 to fp32 and back; autograd saves and replays each
# small op). These autograd Functions do the same math in fewer passes, in the activation dtype with
# fp32 accumulation of the reductions. Each agrees with its reference above within bf16 rounding
# (tests/test_fast_paths.py); benchmarks/train_throughput.py times both.

RMS_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm uses for fp32 and (upcast) bf16 inputs


def _rms_scale(x: torch.Tensor) -> torch.Tensor:
    """1/rms over the last dim, (..., 1) in fp32; the sum of squares is accumulated in fp32."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return ss.square_().div_(x.size(-1)).add_(RMS_EPS).rsqrt_()


def _rms_norm_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of y = x·rstd(x), from the output y: rstd · (g − y · mean(g·y))."""
    coef = torch.linalg.vecdot(grad, y).float().unsqueeze(-1).div_(-y.size(-1)).to(y.dtype)
    return torch.addcmul(grad, y, coef).mul_(rstd.to(y.dtype))


class RMSNorm(torch.autograd.Function):
    """norm(x) in two passes forward (sum of squares, scale) and three backward; saves only the
    output, which the next Linear saves anyway."""

    @staticmethod
    def forward(ctx, x):
        rstd = _rms_scale(x)
        y = x * rstd.to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd = ctx.saved_tensors
        return _rms_norm_backward(grad, y, rstd)


class RotaryNorm(torch.autograd.Function):
    """norm(apply_rotary(x, cos, sin)): the rotation written into one buffer, normalized in place.
    Backward: through the norm, then the inverse rotation (rotation by −angle)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        d = x.size(-1) // 2
        x1, x2 = x[..., :d], x[..., d:]
        y = torch.empty_like(x)
        y1, y2 = y[..., :d], y[..., d:]
        torch.mul(x1, cos, out=y1).addcmul_(x2, sin)
        torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=-1)
        rstd = _rms_scale(y)
        y.mul_(rstd.to(y.dtype))
        ctx.save_for_backward(y, rstd, cos, sin)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd, cos, sin = ctx.saved_tensors
        g = _rms_norm_backward(grad, y, rstd)
        d = g.size(-1) // 2
        g1, g2 = g[..., :d], g[..., d:]
        gx = torch.empty_like(g)
        torch.mul(g1, cos, out=gx[..., :d]).addcmul_(g2, sin, value=-1)
        torch.mul(g2, cos, out=gx[..., d:]).addcmul_(g1, sin)
        return gx, None, None


class ReLUSquared(torch.autograd.Function):
    """relu(x)² saving only relu(x); backward is 2·relu(x)·g."""

    @staticmethod
    def forward(ctx, x):
        h = F.relu(x)
        ctx.save_for_backward(h)
        return h * h

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.mul(grad, h).mul_(2)


# Under torch.compile (CUDA) the references are traced instead: the compiler fuses them and
# derives their backward itself, and the hand-written Functions above would break the graph
# (writes into non-contiguous halves with out=). tests/test_compile.py counts the graphs.

def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable gain (the fast path of reference_norm)."""
    if torch.compiler.is_compiling():
        return reference_norm(x)
    return RMSNorm.apply(x)


def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return reference_rotary_norm(x, cos, sin)
    return RotaryNorm.apply(x, cos, sin)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return reference_relu_squared(x)
    return ReLUSquared.apply(x)


# -----------------------------------------------------------------------------
# Loss: head + softcap + cross-entropy

def reference_head_loss(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """The slow, obvious version: full fp32 logits, softcap, F.cross_entropy (ignore_index -1)."""
    logits = F.linear(x.reshape(-1, x.size(-1)), head_weight.to(x.dtype)).float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1, reduction=reduction)


def _chunk_loss_and_grad(xc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor):
    """One chunk of rows of the fused head: (summed loss in fp32, d(loss)/d(logits) in x's dtype).
    Rows whose target is -1 add no loss; their logit gradient is left as is and masked by the
    caller on the (rows, d) side, which is V/d times cheaper. Written as in-place steps on
    chunk-sized buffers: few passes over memory eagerly, and one fused kernel or two compiled."""
    valid = (tc != -1).unsqueeze(1)
    tanh = F.linear(xc, w).float().div_(SOFTCAP).tanh_()
    logits = tanh * SOFTCAP
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    tgt = tc.clamp(min=0).unsqueeze(1)
    loss = ((lse - logits.gather(1, tgt)) * valid).sum()
    # d(loss)/d(logits) = softmax − one-hot, then through the softcap: × (1 − tanh²)
    g = logits.sub_(lse).exp_()
    g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
    g.addcmul_(g, tanh.square_(), value=-1)
    return loss, g.to(xc.dtype)


_compiled_chunk = None


def compiled_chunk_fn():
    """_chunk_loss_and_grad under torch.compile, built once (for CUDA: the ~10 elementwise fp32
    passes over each chunk's logits become one or two kernels)."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class FusedHeadLoss(torch.autograd.Function):
    """Head matmul, softcap and cross-entropy over chunks of rows, with the gradients computed in
    the same pass. The (B·T, V) fp32 logits never exist all at once and nothing is recomputed:
    backward only scales the stored input and weight gradients. Agrees with reference_head_loss
    (tests/test_model.py). No host synchronization: the valid-row count stays on the device."""

    @staticmethod
    def forward(ctx, x, weight, targets, reduction: str, chunk_rows: int, chunk_fn):
        w = weight.to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, x.size(0), chunk_rows):
            xc, tc = x[i:i + chunk_rows], targets[i:i + chunk_rows]
            loss, g = chunk_fn(xc, w, tc)
            total += loss
            keep = (tc != -1).unsqueeze(1).to(x.dtype)  # ignored rows get no gradient
            torch.mul(g @ w, keep, out=grad_x[i:i + chunk_rows])
            grad_w += (g.t() @ (xc * keep)).float()
        if reduction == "mean":
            scale = 1.0 / (targets != -1).sum().clamp(min=1).float()
        else:
            scale = torch.ones((), device=x.device)
        ctx.save_for_backward(grad_x, grad_w, scale)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, scale = ctx.saved_tensors
        s = grad_out * scale
        return (grad_x * s.to(grad_x.dtype)), (grad_w * s).to(ctx.weight_dtype), None, None, None, None


def chunked_row_losses(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int) -> torch.Tensor:
    """Per-row cross-entropy (0 where the target is -1) without gradients, chunk by chunk: what
    evaluation needs, in chunk_rows × V of logits instead of (B·T) × V (at d20, batch 32 and
    vocab 65,536 the full fp32 logits alone would be 17 GiB)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    w = head_weight.to(x.dtype)
    out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for i in range(0, x.size(0), chunk_rows):
        logits = F.linear(x[i:i + chunk_rows], w).float().div_(SOFTCAP).tanh_().mul_(SOFTCAP)
        out[i:i + chunk_rows] = F.cross_entropy(logits, targets[i:i + chunk_rows], ignore_index=-1,
                                                reduction="none")
    return out


def head_chunk_rows(device: torch.device | str) -> int:
    """Rows of the head per chunk. 512 was fastest on the dev CPU (benchmarks/train_throughput.py;
    docs/LOG.md). On GPUs bigger chunks mean fewer, fuller kernels; 4096 rows at vocab 65,536 is
    1 GiB of fp32 logits per buffer (benchmarks/gpu_check.py times the alternatives)."""
    return 4096 if torch.device(device).type == "cuda" else 512


def head_loss(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
              reduction: str = "mean", chunk_rows: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Cross-entropy of the softcapped head, never materializing the full logits: the fused
    chunked path when training, chunked per-row losses under no_grad (evaluation). `compiled`
    compiles each chunk's elementwise work (used on CUDA with --compile). reduction "none" with
    gradients enabled falls back to the reference (nothing in training needs it)."""
    chunk_rows = chunk_rows or head_chunk_rows(x.device)
    if not torch.is_grad_enabled():
        rows = chunked_row_losses(x, head_weight, targets, chunk_rows)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / (targets != -1).sum().clamp(min=1) if reduction == "mean" else total
    if reduction == "none":
        return reference_head_loss(x, head_weight, targets, reduction)
    chunk_fn = compiled_chunk_fn() if compiled else _chunk_loss_and_grad
    x = x.reshape(-1, x.size(-1))
    return FusedHeadLoss.apply(x, head_weight, targets.reshape(-1), reduction, chunk_rows, chunk_fn)
