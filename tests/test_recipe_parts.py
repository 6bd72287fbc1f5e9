"""The 2026 parts of the model (sliding windows, value embeddings, lambdas, smear, backout, RoPE
base, q·k scale, init) against a slow, obvious reference written here, and every decode path
against the full forward with all of them on."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from picochat.decode import Cache, decode_weights, forward
from picochat.engine import Engine, reference_generate
from picochat.model import GPT, GPTConfig
from picochat.scheduler import generate
from picochat.recipe import model_parts
from test_decode_fast import Tok

ALL_ON = dict(window_pattern="SSSL", short_window=5, value_embeds=True, lambdas=True, smear=True,
              backout=True, rope_base=100_000.0, qk_scale=1.2, init="2026")


def make_model(seed=0, layers=5, **parts) -> GPT:
    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=layers, n_head=2, n_kv_head=2, n_embd=32,
                       **{**ALL_ON, **parts})
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(seed=seed)
    with torch.no_grad():  # parts that init to zero or near it would hide bugs: give them weight
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model written out one piece at a time: per-token loops for smear and value
    embeddings, attention as softmax(q·kᵀ) with an explicit (window) mask."""
    c = model.config
    B, T = idx.shape
    D = c.head_dim
    rms = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731
    inv = 1.0 / (c.rope_base ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)

    emb = rms(model.transformer.wte.weight[idx])
    x = emb.clone()
    if c.smear:
        for t in range(1, T):
            g = model.smear_lambda * torch.sigmoid(emb[:, t, :24] @ model.smear_gate.weight.t())
            x[:, t] = emb[:, t] + g * emb[:, t - 1]
    x0, mid = x, None
    for i, block in enumerate(model.transformer.h):
        a = block.attn
        if c.lambdas:
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        h = rms(x)
        q = (h @ a.c_q.weight.t()).view(B, T, c.n_head, D)
        k = (h @ a.c_k.weight.t()).view(B, T, c.n_kv_head, D)
        v = (h @ a.c_v.weight.t()).view(B, T, c.n_kv_head, D)
        if c.has_value_embed(i):
            for t in range(T):
                gate = 3 * torch.sigmoid(h[:, t, :12] @ a.ve_gate.weight.t())  # (B, H_kv)
                v[:, t] = v[:, t] + gate[..., None] * model.value_embeds[str(i)].weight[idx[:, t]].view(B, -1, D)
        q, k = rms(rope(q)) * c.qk_scale, rms(rope(k)) * c.qk_scale
        scores = torch.einsum("bthd,bshd->bhts", q, k) / D ** 0.5
        window = c.layer_windows()[i]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if window is not None:
            allowed &= ~torch.ones(T, T, dtype=torch.bool).tril(-window - 1)
        y = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        x = x + y.reshape(B, T, -1) @ a.c_proj.weight.t()
        x = x + F.relu(rms(x) @ block.mlp.c_fc.weight.t()).square() @ block.mlp.c_proj.weight.t()
        if c.backout and i == c.n_layer // 2:
            mid = x
    if mid is not None:
        x = x - model.backout_lambda * mid
    logits = rms(x) @ model.lm_head.weight.t()
    return 15 * torch.tanh(logits / 15)


PART_SETS = {
    "all": {},
    "windows only": dict(value_embeds=False, lambdas=False, smear=False, backout=False),
    "value embeddings only": dict(window_pattern="L", lambdas=False, smear=False, backout=False),
    "lambdas only": dict(window_pattern="L", value_embeds=False, smear=False, backout=False),
    "smear only": dict(window_pattern="L", value_embeds=False, lambdas=False, backout=False),
    "backout only": dict(window_pattern="L", value_embeds=False, lambdas=False, smear=False),
}


@pytest.mark.parametrize("name", PART_SETS)
def test_forward_matches_the_slow_reference(name):
    model = make_model(**PART_SETS[name])
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_logits(model, idx), atol=2e-4, rtol=1e-4)


def test_windows_change_the_output_only_past_the_window():
    """Positions within the window see what full attention sees; later ones do not."""
    windowed, full = make_model(seed=3), make_model(seed=3, window_pattern="L")
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = windowed(idx), full(idx)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # window 5: positions 0..5 see everything
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_gradients_match_the_reference():
    model = make_model(seed=4)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    model(idx).square().mean().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_logits(model, idx).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-3, msg=n)


def test_every_decode_path_equals_the_full_forward():
    model = make_model(seed=5)
    prompt = [3, 17, 42, 8, 1, 77, 23]
    steps = 18  # well past the window of 5
    expected = reference_generate(model, prompt, 1, steps)[0]  # the training forward, whole sequence
    rows = [list(step) for step, _ in generate(Engine(model, Tok()), prompt, num_samples=3, max_tokens=steps,
                                                 temperature=0.0)]
    assert [list(r) for r in zip(*rows)] == [expected] * 3  # picochat.decode, rows at one position


def test_rows_at_different_positions_decode_as_alone():
    """Prompts prefilled alone, loaded into one cache, then decoded together at their own lengths."""
    model = make_model(seed=6)
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 5, 6, 7, 8], [11]]
    alone = [reference_generate(model, p, 1, 10)[0] for p in prompts]
    engine = Engine(model, Tok())
    cache = engine.new_cache(3, 32)
    last = []
    for row, p in enumerate(prompts):
        logits, pre = engine.prefill(p)
        last.append(int(logits[0].argmax()))
        cache.load_row(row, pre)
    cache.rows = 3
    out = [[t] for t in last]
    for _ in range(9):
        logits = engine.forward(torch.tensor([[o[-1]] for o in out]), cache, masked=True)
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
    assert out == alone


def test_prefill_in_chunks_equals_one_prefill():
    model = make_model(seed=7)
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    cache, w = Cache(model.config, 2, 19, "cpu", torch.float32), decode_weights(model)
    with torch.no_grad():
        whole = model(idx)
        parts = [forward(w, idx[:, a:b], torch.full((2,), a), cache.k, cache.v, cache.tokens, b, False)
                 for a, b in [(0, 4), (4, 5), (5, 12), (12, 19)]]
    torch.testing.assert_close(torch.stack(parts, 1), whole[:, [3, 4, 11, 18]], atol=1e-5, rtol=1e-5)


def test_seed_config_is_the_seed_model():
    """Defaults are the seed's: an old config dict (no 2026 fields) builds the same parameters
    and the same init as before, and a recipe switches all the parts at once."""
    old = dict(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    config = GPTConfig(**old)
    assert config.is_seed() and GPTConfig(**old, **model_parts("seed", 32)) == config
    assert not GPTConfig(**old, **model_parts("2026", 32)).is_seed()
    names = {n for n, _ in GPT(config).named_parameters()}
    assert not any(k in n for n in names for k in ("value_embeds", "lambda", "smear", "ve_gate"))


def test_flops_count_windows_and_skip_lookups():
    on = make_model()
    c = on.config
    linear = sum(p.numel() for n, p in on.named_parameters()
                 if n.endswith("weight") and "wte" not in n and "value_embeds" not in n)
    seen = sum(c.sequence_len if w is None else min(w, c.sequence_len) for w in c.layer_windows())
    assert on.flops_per_token() == 6 * linear + 12 * c.n_head * c.head_dim * seen
    seed = GPT(dataclasses.replace(c, **model_parts("seed", c.sequence_len)))
    wte = seed.transformer.wte.weight.numel()
    assert seed.flops_per_token() == 6 * (seed.num_params() - wte) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def test_bad_window_pattern_is_refused():
    with pytest.raises(ValueError, match="S and L"):
        GPTConfig(window_pattern="SXL", short_window=4)
    with pytest.raises(ValueError, match="short_window"):
        GPTConfig(window_pattern="SL")


def test_a_checkpoint_written_before_the_2026_parts_loads_with_the_same_logits(home):
    """tests/fixtures/seed_checkpoint was saved by picochat before GPTConfig had the 2026 fields
    (commit 53af0a4), with the logits that code computed for fixed ids."""
    import shutil
    from pathlib import Path

    from picochat.checkpoint import load_model
    fixture = Path(__file__).parent / "fixtures" / "seed_checkpoint"
    shutil.copytree(fixture / "step_000005", home / "checkpoints" / "base" / "seedfixture" / "step_000005")
    model, meta = load_model("base", "seedfixture", "cpu")
    assert model.config.is_seed() and "window_pattern" not in meta["model_config"]
    expected = torch.load(fixture / "expected_logits.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(model(expected["ids"]), expected["logits"])
