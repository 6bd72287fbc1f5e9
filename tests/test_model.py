"""The GPT: size arithmetic, cached decoding against the full forward, and the fused head loss against its reference."""
import pytest
import torch

from picochat.model import GPT, GPTConfig, config_from_depth
from picochat.ops import head_loss, norm, reference_head_loss


def make_model(n_head=4, n_kv_head=4, seed=0):
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(cfg)
    model.init_weights(seed=seed)
    # zero-init output projections make every block the identity; perturb so the test means something
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def test_d20_at_vocab_65536_has_exactly_560988160_parameters():
    with torch.device("meta"):
        model = GPT(config_from_depth(20, vocab_size=65536, sequence_len=2048))
    assert model.config.n_embd == 1280 and model.config.n_head == 10
    assert model.num_params() == 560_988_160
    # d32: 1,879,048,192 params and 1.207960e10 FLOPs/token, as printed in nanochat's run1000.sh
    with torch.device("meta"):
        d32 = GPT(config_from_depth(32, vocab_size=65536, sequence_len=2048))
    assert d32.num_params() == 1_879_048_192
    assert round(d32.flops_per_token() / 1e4) == 1_207_960


def test_every_depth_from_1_to_64_builds_a_model_with_heads_of_128():
    # the width 64·depth is rounded up to a multiple of 128 (odd depths used to raise ValueError)
    for depth in range(1, 65):
        config = config_from_depth(depth, vocab_size=256, sequence_len=64)
        assert config.n_layer == depth and config.head_dim == 128
        assert config.n_head * config.head_dim == config.n_embd >= 64 * depth
        assert config.n_embd - 64 * depth < 128
        with torch.device("meta"):
            GPT(config)
    # the seed depths keep their exact widths (64·depth, a multiple of 128 already)
    for depth, width, heads in [(12, 768, 6), (20, 1280, 10), (26, 1664, 13), (32, 2048, 16)]:
        config = config_from_depth(depth)
        assert (config.n_embd, config.n_head, config.head_dim) == (width, heads, 128)
    assert (config_from_depth(5).n_embd, config_from_depth(5).n_head) == (384, 3)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_decoding_equals_full_forward(n_kv_head):
    """picochat.decode's forward (a prefill, single tokens, a chunk after a prefix) against the
    training forward over the whole sequence. Tolerance: 1e-4 absolute on fp32 logits (softcapped
    to ±15); the paths differ in summation order inside attention."""
    from picochat.decode import Cache, decode_weights, forward
    torch.manual_seed(0)
    model = make_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 20))
    cache, w = Cache(model.config, 2, 20, "cpu", torch.float32), decode_weights(model)
    with torch.no_grad():
        full = model(idx)
        got = [forward(w, idx[:, a:b], torch.full((2,), a), cache.k, cache.v, cache.tokens, b, False)
               for a, b in [(0, 8), (8, 9), (9, 10), (10, 11), (11, 12), (12, 20)]]
    torch.testing.assert_close(torch.stack(got, 1), full[:, [7, 8, 9, 10, 11, 19]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_head_loss_matches_reference_loss_and_gradients(reduction):
    torch.manual_seed(0)
    x = norm(torch.randn(3, 50, 32)).requires_grad_()
    w = (0.2 * torch.randn(300, 32)).requires_grad_()
    targets = torch.randint(0, 300, (3, 50))
    targets[0, :7] = -1  # ignored positions
    ref = reference_head_loss(x, w, targets, reduction)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    fused = head_loss(x, w, targets, reduction, chunk_rows=16)  # several chunks, a ragged last one
    gx, gw = torch.autograd.grad(fused, (x, w))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


def test_fused_head_loss_is_finite_when_every_target_is_ignored():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    loss = head_loss(x, w, torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = config_from_depth(2, vocab_size=100, sequence_len=16)
    model = GPT(cfg)
    d, L = cfg.n_embd, cfg.n_layer
    matmuls = 12 * L * d * d + 100 * d  # blocks + head, not the embedding lookup
    assert model.flops_per_token() == 6 * matmuls + 12 * L * d * 16


class LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows of logits (a tensor whose last dim is the vocab) any op produces."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.numel = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.size(-1) == self.vocab:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_evaluation_loss_matches_reference_without_materializing_the_logits(reduction):
    # An evaluation pass (no grad) of 4×256 rows over a vocab of 1000: the full logits are
    # 1024×1000 values; in chunks of 128 rows no tensor may exceed 128×1000.
    torch.manual_seed(0)
    x, w = norm(torch.randn(4, 256, 16)), 0.3 * torch.randn(1000, 16)
    targets = torch.randint(0, 1000, (4, 256))
    targets[1, :30] = -1
    ref = reference_head_loss(x, w, targets, reduction)
    with torch.no_grad(), LargestLogits(1000) as seen:
        got = head_loss(x, w, targets, reduction, chunk_rows=128)
    assert seen.numel <= 128 * 1000
    torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_the_model_forward_evaluates_in_chunks_too():
    model = make_model()
    idx = torch.randint(0, model.config.vocab_size, (32, 32))  # 1024 rows, chunks of 512 on a CPU
    with torch.no_grad(), LargestLogits(model.config.vocab_size) as seen:
        per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (32 * 32,)
    assert seen.numel <= 512 * model.config.vocab_size
