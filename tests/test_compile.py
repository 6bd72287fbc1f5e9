"""
torch.compile on CUDA compiles the trunk (base, mid and SFT training) and each chunk of the fused
head. A graph break splits the compiled program and costs speed silently, so these count graphs
with torch._dynamo on the CPU (tracing needs no GPU), and check that what the compiler traces
computes what the eager model computes (the aot_eager backend runs the traced graphs, forward and
backward, without generating kernels).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from picochat.model import GPT, config_from_depth
from picochat.ops import _chunk_loss_and_grad, head_loss, norm
from picochat.recipe import model_parts

RECIPES = pytest.mark.parametrize("recipe", ["seed", "2026"])  # 2026: every part on, a window of 8


def tiny_model(dtype=torch.float32, seed=0, recipe="seed"):
    parts = {**model_parts(recipe, 64), **({"short_window": 8} if recipe == "2026" else {})}
    model = GPT(config_from_depth(2, vocab_size=512, sequence_len=64, **parts), compute_dtype=dtype)
    model.init_weights(seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # zero-init projections make blocks the identity; perturb them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@RECIPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_trunk_is_one_graph_with_no_breaks(dtype, recipe):
    dynamo.reset()
    model = tiny_model(dtype, recipe=recipe)
    explained = dynamo.explain(model.trunk)(torch.randint(0, 512, (2, 64)))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


def test_the_compiled_head_chunk_is_one_graph_with_no_breaks():
    dynamo.reset()
    x, w = torch.randn(64, 32), torch.randn(512, 32)
    targets = torch.randint(0, 512, (64,))
    explained = dynamo.explain(_chunk_loss_and_grad)(x, w, targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@RECIPES
def test_the_traced_trunk_and_head_give_the_eager_loss_and_gradients(recipe):
    dynamo.reset()
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    targets[0, :5] = -1

    def run(compiled):
        model = tiny_model(recipe=recipe)
        trunk = torch.compile(model.trunk, backend="aot_eager", dynamic=False) if compiled else model.trunk
        loss = head_loss(trunk(idx), model.lm_head.weight, targets, chunk_rows=48)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    eager_loss, eager_grads = run(False)
    traced_loss, traced_grads = run(True)
    torch.testing.assert_close(traced_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(traced_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_traced_head_chunk_matches_the_eager_one():
    dynamo.reset()
    torch.manual_seed(0)
    x, w = norm(torch.randn(96, 32)), 0.3 * torch.randn(512, 32)
    targets = torch.randint(0, 512, (96,))
    targets[:9] = -1
    traced = torch.compile(_chunk_loss_and_grad, backend="aot_eager", dynamic=False)
    loss, g = traced(x, w, targets)
    ref_loss, ref_g = _chunk_loss_and_grad(x, w, targets)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(g, ref_g)


def test_the_compiled_head_path_gives_the_eager_loss_and_gradients(monkeypatch):
    # head_loss(compiled=True), as base_train calls it on CUDA, with the chunk traced by aot_eager
    # (inductor would need a C++ toolchain and minutes here; the wiring is what this checks)
    import picochat.ops as M
    dynamo.reset()
    traced, calls = torch.compile(_chunk_loss_and_grad, backend="aot_eager", dynamic=False), []
    monkeypatch.setattr(M, "_compiled_chunk", lambda *a: calls.append(1) or traced(*a))
    torch.manual_seed(0)
    x0, w0 = norm(torch.randn(2, 50, 32)), 0.3 * torch.randn(512, 32)
    targets = torch.randint(0, 512, (2, 50))
    targets[1, :7] = -1
    results = []
    for compiled in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = head_loss(x, w, targets, chunk_rows=32, compiled=compiled)  # a ragged last chunk
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    assert len(calls) == 4  # the compiled path ran, once per chunk of 32 of the 100 rows
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
