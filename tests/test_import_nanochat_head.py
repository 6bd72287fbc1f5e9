"""nanochat HEAD checkpoints come in (`picochat import`): a checkpoint written in HEAD's on-disk
layout (padded vocabulary, bf16 embeddings, sliding windows, value embeddings, lambdas, smear,
backout) gives picochat exactly the logits HEAD's own forward gives in fp32; the designs before
HEAD map onto their parts or are refused in one line; chat, serve and export run the imported model.

The expected logits come from `head_forward` below, nanochat HEAD's GPT.forward written out from its
source (nanochat/gpt.py and nanochat/flash_attention.py as of 2026-07-03) for a CPU in fp32, where
HEAD's COMPUTE_DTYPE is fp32 and attention is its SDPA fallback; it never calls picochat's model."""
import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import tiktoken
import torch
import torch.nn.functional as F

from picochat.common import PicochatError
from stagerun import picochat

pytestmark = pytest.mark.usefixtures("one_thread")

# A small HEAD model: 4 layers (value embeddings on 1 and 3, backout after 2), GQA (4 heads, 2 kv
# heads), context 256, so HEAD's short window is 128 and prompts of ~200 tokens run past it.
MODEL_CONFIG = {"sequence_len": 256, "vocab_size": 399, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                "n_embd": 64, "window_pattern": "SSSL"}
KEEP_TOKENS = 390  # the tiny tokenizer cut to 390 ranks + 9 specials = 399: padded to 448 rows

# nanochat's designs, as the reference forward needs them (picochat/interop/nanochat.py's table)
HEAD = dict(qk_scale=1.2, rope_base=100_000, short=lambda T: -(-T // 4 // 128) * 128, smear_backout=True)
ROUND_1 = dict(qk_scale=1.15, rope_base=100_000, short=lambda T: -(-T // 3 // 128) * 128, smear_backout=False)
EARLY = dict(qk_scale=None, rope_base=10_000, short=lambda T: T // 2, smear_backout=False)


# -----------------------------------------------------------------------------
# HEAD's on-disk format, and its forward

def padded(vocab: int) -> int:
    return -(-vocab // 64) * 64  # GPT.__init__'s pad_vocab_size_to=64


def head_state(config: dict, seed: int, gate_width: int = 12, value_embeds: bool = True,
               smear_backout: bool = True) -> dict:
    """Random weights under the names and shapes HEAD's GPT.state_dict() has after training on
    CUDA: wte, lm_head and each value embedding with the vocabulary padded to a multiple of 64,
    wte and the value embeddings in bf16 (COMPUTE_DTYPE), everything else fp32. No zeros, so every
    tensor moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    V, C, L = padded(config["vocab_size"]), config["n_embd"], config["n_layer"]
    D, H, Hkv = C // config["n_head"], config["n_head"], config["n_kv_head"]

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    state = {"transformer.wte.weight": rand(V, C, std=0.8).bfloat16()}
    for i in range(L):
        p = f"transformer.h.{i}."
        state[p + "attn.c_q.weight"] = rand(H * D, C, std=C ** -0.5)
        state[p + "attn.c_k.weight"] = rand(Hkv * D, C, std=C ** -0.5)
        state[p + "attn.c_v.weight"] = rand(Hkv * D, C, std=C ** -0.5)
        state[p + "attn.c_proj.weight"] = rand(C, C, std=0.5 * C ** -0.5)
        if value_embeds and i % 2 == (L - 1) % 2:  # has_ve
            state[p + "attn.ve_gate.weight"] = rand(Hkv, gate_width, std=0.5)
        state[p + "mlp.c_fc.weight"] = rand(4 * C, C, std=C ** -0.5)
        state[p + "mlp.c_proj.weight"] = rand(C, 4 * C, std=0.5 * (4 * C) ** -0.5)
    state["lm_head.weight"] = rand(V, C, std=0.3)
    state["resid_lambdas"] = 1.1 + rand(L, std=0.05)
    state["x0_lambdas"] = 0.1 + rand(L, std=0.05)
    if smear_backout:
        state["smear_gate.weight"] = rand(1, 24, std=0.3)
        state["smear_lambda"] = torch.tensor([0.4])
        state["backout_lambda"] = torch.tensor([0.25])
    if value_embeds:
        for i in range(L):
            if i % 2 == (L - 1) % 2:
                state[f"value_embeds.{i}.weight"] = rand(V, Hkv * D, std=0.5).bfloat16()
    return state


def head_forward(raw: dict, config: dict, idx: torch.Tensor, design: dict = HEAD) -> torch.Tensor:
    """nanochat's GPT.forward(idx) -> fp32 logits (B, T, vocab), op for op, on what its build_model
    loads on a CPU: bf16 tensors made float, "_orig_mod." cut from names, missing lambdas patched
    (ones, zeros), a missing window_pattern "L". `design` switches the few numbers and parts that
    changed between nanochat's designs (HEAD by default)."""
    sd = {k.removeprefix("_orig_mod."): v.float() if v.dtype == torch.bfloat16 else v for k, v in raw.items()}
    L, H, Hkv, C = config["n_layer"], config["n_head"], config["n_kv_head"], config["n_embd"]
    D, V, T_max = C // H, config["vocab_size"], config["sequence_len"]
    sd.setdefault("resid_lambdas", torch.ones(L))
    sd.setdefault("x0_lambdas", torch.zeros(L))
    # nn.Parameters, as in HEAD's module: torch.matmul picks its kernel by requires_grad (a batched
    # input it cannot flatten, like the smear gate's x[:, 1:, :24], is folded into one matmul only
    # for a weight that requires grad), and that changes the last bits.
    sd = {k: v.detach().requires_grad_() for k, v in sd.items()}
    norm = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731
    linear = lambda x, w: F.linear(x, w.to(dtype=x.dtype))  # noqa: E731 (nanochat's Linear)
    # _compute_window_sizes: (left, 0) per layer; L = the whole context, last layer always L
    pattern = config.get("window_pattern", "L").upper()
    windows = [design["short"](T_max) if pattern[i % len(pattern)] == "S" else T_max for i in range(L)]
    windows[-1] = T_max
    # _precompute_rotary_embeddings, in COMPUTE_DTYPE = fp32
    inv_freq = 1.0 / (design["rope_base"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(10 * T_max, dtype=torch.float32), inv_freq)
    B, T = idx.shape
    cos, sin = freqs.cos()[None, :T, None, :], freqs.sin()[None, :T, None, :]

    def rotary(x):  # apply_rotary_emb
        d = x.shape[3] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)

    def attention(q, k, v, window):  # flash_attn_func's SDPA fallback (_sdpa_attention)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = q.size(1) != k.size(1)
        Tq, Tk = q.size(2), k.size(2)
        if (window < 0 or window >= Tq) and Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            row = (Tk - Tq) + torch.arange(Tq).unsqueeze(1)
            col = torch.arange(Tk).unsqueeze(0)
            mask = col <= row
            if 0 <= window < Tk:
                mask = mask & ((row - col) <= window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)

    x = norm(F.embedding(idx, sd["transformer.wte.weight"]))
    if design["smear_backout"]:
        gate = sd["smear_lambda"].to(x.dtype) * torch.sigmoid(linear(x[:, 1:, :24], sd["smear_gate.weight"]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_backout = x, None
    for i in range(L):
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        ve = sd.get(f"value_embeds.{i}.weight")
        ve = F.embedding(idx, ve).to(x.dtype) if ve is not None else None
        p = f"transformer.h.{i}."
        h = norm(x)  # Block: x + attn(norm(x)), then x + mlp(norm(x))
        q = linear(h, sd[p + "attn.c_q.weight"]).view(B, T, H, D)
        k = linear(h, sd[p + "attn.c_k.weight"]).view(B, T, Hkv, D)
        v = linear(h, sd[p + "attn.c_v.weight"]).view(B, T, Hkv, D)
        if ve is not None:
            gate_w = sd[p + "attn.ve_gate.weight"]
            gate = 3 * torch.sigmoid(linear(h[..., :gate_w.size(1)], gate_w))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        q, k = norm(rotary(q)), norm(rotary(k))
        if design["qk_scale"] is not None:
            q, k = q * design["qk_scale"], k * design["qk_scale"]
        y = attention(q, k, v, windows[i]).contiguous().view(B, T, -1)
        x = x + linear(y, sd[p + "attn.c_proj.weight"])
        x = x + linear(F.relu(linear(norm(x), sd[p + "mlp.c_fc.weight"])).square(), sd[p + "mlp.c_proj.weight"])
        if design["smear_backout"] and i == L // 2:
            x_backout = x
    if x_backout is not None:
        x = x - sd["backout_lambda"].to(x.dtype) * x_backout
    logits = linear(norm(x), sd["lm_head.weight"])[..., :V].float()
    return 15 * torch.tanh(logits / 15)


def cut_tokenizer(tokenizer, n: int):
    """The first n ranks of a BPE tokenizer (still a BPE: every merge's parts rank lower)."""
    from picochat.tokenizer import Tokenizer
    return Tokenizer({token: i for i, token in enumerate(tokenizer.tokens[:n])}, tokenizer.pattern)


def write_head_checkpoint(cache, tokenizer, state: dict, config: dict, step: int, tag: str = "d4",
                          prefix: str = "") -> "os.PathLike":
    """nanochat's cache as its base_train writes it: <cache>/base_checkpoints/<tag>/model_NNNNNN.pt
    (torch.save of the state dict) and meta_NNNNNN.json (model_config = asdict(GPTConfig)), with
    <cache>/tokenizer/tokenizer.pkl (a pickled tiktoken Encoding) beside."""
    ckpt = cache / "base_checkpoints" / tag
    ckpt.mkdir(parents=True)
    torch.save({prefix + k: v for k, v in state.items()}, ckpt / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.23, "model_config": config, "user_config": {"depth": config["n_layer"]},
            "device_batch_size": 4, "max_seq_len": config["sequence_len"]}
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    (cache / "tokenizer").mkdir(exist_ok=True)
    encoding = tiktoken.Encoding("rustbpe", pat_str=tokenizer.pattern,
                                 mergeable_ranks={t: i for i, t in enumerate(tokenizer.tokens)},
                                 special_tokens=tokenizer.special_ids)
    (cache / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    return ckpt


def prompts(tokenizer, length: int = 200) -> list[list[int]]:
    """Two prompts of `length` tokens (200: past HEAD's short window of 128 at context 256)."""
    texts = ["The king said to the queen: good night, sweet lady. " * 30,
             "What shall we do now? Come, go away, my noble lord! Love and death, night and day. " * 20]
    out = [tokenizer.encode(t, prepend="<|bos|>")[:length] for t in texts]
    assert all(len(p) == length for p in out), [len(p) for p in out]
    return out


@pytest.fixture
def head_setup(tiny_home, tmp_path):
    """(cut tokenizer, HEAD state dict, nanochat cache folder) with a fresh cache per test."""
    from picochat.tokenizer import Tokenizer
    tokenizer = cut_tokenizer(Tokenizer.load(tiny_home / "tokenizer"), KEEP_TOKENS)
    assert tokenizer.vocab_size == MODEL_CONFIG["vocab_size"] and padded(tokenizer.vocab_size) == 448
    return tokenizer, head_state(MODEL_CONFIG, seed=0), tmp_path / "nanochat"


@pytest.fixture
def reference_ops(monkeypatch):
    """picochat's model with its plain reference ops in place of the fused ones (RMSNorm,
    RoPE + QK-norm, ReLU²): the same math, and the same float operations as nanochat's."""
    import picochat.model as model
    import picochat.ops as ops
    for fused, reference in [("norm", "reference_norm"), ("rotary_norm", "reference_rotary_norm"),
                             ("relu_squared", "reference_relu_squared")]:
        monkeypatch.setattr(model, fused, getattr(ops, reference))


def import_and_load(home, ckpt, *args, stage="base", tag="d4"):
    """`picochat import` into `home` (conftest's fixture: this process's PICOCHAT_HOME), then the
    model as chat and serve load it."""
    from picochat.checkpoint import load_model
    proc = picochat(home, "import", str(ckpt), "--stage", stage, *args)
    model, meta = load_model(stage, tag, "cpu", compute_dtype=torch.float32)
    return model, meta, proc.stdout


# -----------------------------------------------------------------------------
# HEAD's logits, exactly

# picochat's fused RMSNorm and RoPE + QK-norm (model.py's eager fast path) take 1/rms from
# torch.linalg.vector_norm (a square root, squared again) where F.rms_norm takes the mean of
# squares: the same value up to the last bit of each row's scale. Measured: at most 4.8e-6 on these
# logits (|logits| up to ~10); its ReLU² gives the same bits as nanochat's.
FUSED_ATOL = 2e-5


@pytest.mark.slow
def test_head_checkpoint_imports_with_bit_identical_logits(head_setup, home, reference_ops):
    tokenizer, state, cache = head_setup
    ckpt = write_head_checkpoint(cache, tokenizer, state, MODEL_CONFIG, step=2500)
    model, meta, out = import_and_load(home, ckpt)
    assert "nanochat HEAD" in out and meta["imported"]["design"].startswith("nanochat HEAD")
    c = model.config
    assert (c.window_pattern, c.short_window, c.value_embeds, c.lambdas, c.smear, c.backout, c.rope_base,
            c.qk_scale, c.vocab_size) == ("SSSL", 128, True, True, True, True, 100_000.0, 1.2, 399)
    assert model.transformer.wte.weight.shape == (399, 64)  # the padding rows are gone
    assert model.value_embeds["1"].weight.shape == (399, 32) and model.lm_head.weight.shape == (399, 64)
    # bf16 tables widened exactly, fp32 tensors bit for bit, patched nothing
    ours = model.state_dict()
    for name, tensor in state.items():
        rows = tensor[:399] if tensor.size(0) == 448 else tensor
        assert torch.equal(ours[name], rows.float()), name
    for prompt in prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            assert torch.equal(model(ids), head_forward(state, MODEL_CONFIG, ids))
    batch = torch.tensor([p[:150] for p in prompts(tokenizer)])  # rows of a batch too
    with torch.no_grad():
        assert torch.equal(model(batch), head_forward(state, MODEL_CONFIG, batch))


@pytest.mark.slow
def test_head_logits_through_picochat_fused_ops_agree_within_rounding(head_setup, home):
    tokenizer, state, cache = head_setup
    ckpt = write_head_checkpoint(cache, tokenizer, state, MODEL_CONFIG, step=7, prefix="_orig_mod.")
    model, _, _ = import_and_load(home, ckpt)
    for prompt in prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            got, expected = model(ids), head_forward(state, MODEL_CONFIG, ids)
        assert torch.allclose(got, expected, rtol=0, atol=FUSED_ATOL), (got - expected).abs().max()


# -----------------------------------------------------------------------------
# The designs before HEAD, HEAD's loader's patches, and what cannot come in

def import_in_process(ckpt, tag):
    """`picochat import` in this process (cheaper than a subprocess); the model as chat loads it."""
    from picochat.checkpoint import load_model
    from picochat.stages import import_
    import_.main([str(ckpt), "--stage", "base", "--model-tag", tag])
    return load_model("base", tag, "cpu", compute_dtype=torch.float32)[0]


def assert_same_logits(model, state, config, design, tokenizer, length=200):
    for prompt in prompts(tokenizer, length):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            assert torch.equal(model(ids), head_forward(state, config, ids, design))


@pytest.mark.slow
def test_earlier_nanochat_designs_map_onto_their_parts(head_setup, home, reference_ops):
    tokenizer, head, cache = head_setup
    # HEAD's loader: a model_config without window_pattern is all "L"; missing x0_lambdas are zeros
    config = {k: v for k, v in MODEL_CONFIG.items() if k != "window_pattern"}
    state = {k: v for k, v in head.items() if k != "x0_lambdas"}
    model = import_in_process(write_head_checkpoint(cache / "a", tokenizer, state, config, 1), "nowindows")
    assert (model.config.window_pattern, model.config.lambdas) == ("L", True)
    assert torch.equal(model.x0_lambdas, torch.zeros(4))
    assert_same_logits(model, state, config, HEAD, tokenizer)

    # 2026-03-09 to 03-14: 12-channel gates, no smear or backout, q·k × 1.15, S = T/3 up to 128
    config = dict(MODEL_CONFIG, sequence_len=512)
    state = head_state(config, seed=1, smear_backout=False)
    model = import_in_process(write_head_checkpoint(cache / "b", tokenizer, state, config, 1), "round1")
    c = model.config
    assert (c.short_window, c.qk_scale, c.rope_base, c.smear, c.backout, c.value_embeds) == (
        256, 1.15, 100_000.0, False, False, True)
    assert_same_logits(model, state, config, ROUND_1, tokenizer, length=300)

    # 2026-01-11 to 01-18: lambdas and windows (S = T/2), RoPE base 10,000, no value embeddings
    config = dict(MODEL_CONFIG, window_pattern="SL")
    state = head_state(config, seed=2, value_embeds=False, smear_backout=False)
    model = import_in_process(write_head_checkpoint(cache / "c", tokenizer, state, config, 1), "early")
    c = model.config
    assert (c.short_window, c.qk_scale, c.rope_base, c.value_embeds, c.lambdas) == (128, 1.0, 10_000.0, False, True)
    assert_same_logits(model, state, config, EARLY, tokenizer)

    # the seed's design with a padded vocabulary (2025-12-09 on): the seed architecture again
    config = {k: v for k, v in MODEL_CONFIG.items() if k != "window_pattern"}
    state = {k: v for k, v in head_state(config, seed=3, value_embeds=False, smear_backout=False).items()
             if not k.endswith("_lambdas")}
    model = import_in_process(write_head_checkpoint(cache / "d", tokenizer, state, config, 1), "padded")
    assert model.config.is_seed() and model.lm_head.weight.shape == (399, 64)
    assert_same_logits(model, state, config, EARLY, tokenizer)


def test_nanochat_designs_picochat_cannot_hold_are_refused_in_one_line(head_setup, home):
    from picochat.stages import import_
    tokenizer, head, cache = head_setup
    cases = [  # (what is changed, the refusal's words)
        ("gates32", head_state(MODEL_CONFIG, seed=0, gate_width=32, smear_backout=False), MODEL_CONFIG,
         ["gates reading 32 channels", "cannot be imported"]),
        ("ungated", {k: v for k, v in head.items() if "ve_gate" not in k and "smear" not in k and "backout" not in k},
         MODEL_CONFIG, ["value embeddings with no gates"]),
        ("engram", dict(head, **{"bigram_embed.weight": torch.zeros(8, 64)}), MODEL_CONFIG,
         ["unexpected tensor bigram_embed.weight"]),
        ("nobackout", {k: v for k, v in head.items() if k != "backout_lambda"}, MODEL_CONFIG,
         ["missing tensor backout_lambda"]),
        ("rows", dict(head, **{"lm_head.weight": torch.zeros(400, 64)}), MODEL_CONFIG,
         ["lm_head.weight has shape [400, 64]"]),
        ("later", head, dict(MODEL_CONFIG, mtp_heads=2), ["model_config has mtp_heads", "later design"]),
        ("pattern", head, dict(MODEL_CONFIG, window_pattern="SXL"), ["S and L"]),
    ]
    for name, state, config, phrases in cases:
        ckpt = write_head_checkpoint(cache / name, tokenizer, state, config, 1)
        with pytest.raises(PicochatError) as refused:
            import_.main([str(ckpt), "--stage", "base", "--model-tag", name])
        message = str(refused.value)
        assert len(message.splitlines()) == 1 and all(p in message for p in phrases), message
    assert not (home / "checkpoints").exists()


# -----------------------------------------------------------------------------
# Running the imported model: picochat's decoding, chat, serve and export

# Greedy tokens are compared where the reference's top two logits are further apart than this (the
# decode path's fp32 rounding differs from the full forward's by ~1e-6).
TIE_MARGIN = 1e-4


@pytest.mark.slow
def test_imported_head_model_decodes_chats_and_serves(head_setup, home):
    import httpx

    from picochat.engine import Engine
    from picochat.scheduler import generate_batch
    from serve_fixtures import running_server
    tokenizer, state, cache = head_setup
    model, _, _ = import_and_load(home, write_head_checkpoint(cache, tokenizer, state, MODEL_CONFIG, 3), stage="sft")
    # picochat's KV-cache decoding (windows past 128 tokens, smear's predecessor from the cache)
    # picks the tokens HEAD's full forward ranks first
    engine = Engine(model, tokenizer)
    for prompt in prompts(tokenizer, 180):
        greedy = generate_batch(engine, prompt, max_tokens=40, temperature=0.0)[0][0][len(prompt):]
        assert len(greedy) >= 10
        with torch.no_grad():
            expected = head_forward(state, MODEL_CONFIG, torch.tensor([prompt + greedy]))[0, len(prompt) - 1:-1]
        top2 = expected.topk(2).values
        clear = top2[:, 0] - top2[:, 1] > TIE_MARGIN
        assert clear.float().mean() > 0.8
        assert expected.argmax(-1)[clear].tolist() == torch.tensor(greedy)[clear].tolist()
    chat = picochat(home, "chat", "-p", "Hello", "-t", "0", "--plain", "--max-tokens", "8", "--device", "cpu")
    assert "Assistant" in chat.stdout
    with running_server(home, "--model-tag", "d4") as url:
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200 and isinstance(reply.json()["choices"][0]["message"]["content"], str)


@pytest.mark.slow
def test_imported_head_model_exports_to_transformers_with_its_logits(head_setup, home, tmp_path):
    from transformers import AutoModelForCausalLM
    tokenizer, state, cache = head_setup
    picochat(home, "import", str(write_head_checkpoint(cache, tokenizer, state, MODEL_CONFIG, 3)), "--stage", "base")
    out = tmp_path / "d4-hf"
    exported = picochat(home, "export", "--source", "base", "--out", str(out))
    assert "trust_remote_code=True" in exported.stdout
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for prompt in prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            got, expected = theirs(ids).logits, head_forward(state, MODEL_CONFIG, ids)
        assert torch.allclose(got, expected, rtol=0, atol=1e-4), (got - expected).abs().max()
