"""
The fast decode path (GPT.decode_step over prepared weights, picochat/model.py) against the slow,
obvious loop (picochat.engine.reference_generate: the model's own forward, one step at a time) and
against the engine run through the model's plain forward; the compiled path (CompiledDecode, via
torch.compile's aot_eager backend on CPU) against eager. All fp32 on CPU, tiny random models.

    pytest -q tests/test_decode_fast.py
"""
from __future__ import annotations

import copy

import pytest
import torch

from picochat.engine import Engine, reference_generate
from picochat.model import GPT, CompiledDecode, CompiledPrefill, GPTConfig
from picochat.recipe import model_parts
from picochat.scheduler import Job, Scheduler

VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Tok:
    """Just what the engine needs. Special tokens default to ids the model can never emit."""

    def __init__(self, **special):
        self.bos_id = special.pop("bos", VOCAB + 5)
        names = ["python_start", "python_end", "output_start", "output_end", "assistant_end"]
        self.special = {f"<|{n}|>": special.get(n, VOCAB + i) for i, n in enumerate(names)}

    def encode_special(self, name):
        return self.special[name]

    @property
    def special_ids(self):
        return {**self.special, "<|bos|>": self.bos_id}

    def encode(self, text):
        return [30 + ord(c) % 64 for c in text]

    def decode(self, ids):
        return ",".join(map(str, ids))

    def id_to_bytes(self, t):
        return b"x"


def random_model(seed=0, n_kv_head=2, n_embd=64, recipe="seed"):
    """recipe "2026": every part on, 4 layers (windows of 6 on layers 0-2 so that decodes run past
    them, value embeddings on 1 and 3, backout after 2, which the last layer does not cancel)."""
    parts = {**model_parts(recipe, 64), **({"short_window": 6} if recipe == "2026" else {})}
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=4 if recipe == "2026" else 2, n_head=4,
                       n_kv_head=n_kv_head, n_embd=n_embd, **parts)
    model = GPT(config)
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the head and output projections start at zero: make every layer count
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def plain(model):
    """The same model decoding through its plain forward (GPT.decode_step falls back to it)."""
    slow = copy.deepcopy(model)
    forward = slow.forward
    slow.forward = lambda *a, **k: forward(*a, **k)
    return slow


def prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def columns(engine, prompt, n, max_tokens, **kw):
    out = [(col, mask) for col, mask in engine.generate(prompt, num_samples=n, max_tokens=max_tokens, **kw)]
    return [list(r) for r in zip(*[c for c, _ in out])], [list(r) for r in zip(*[m for _, m in out])]


RECIPES = pytest.mark.parametrize("recipe", ["seed", "2026"])


@RECIPES
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("kv", [4, 2])
def test_fast_greedy_equals_the_plain_loop(n, kv, recipe):
    model = random_model(n_kv_head=kv, recipe=recipe)
    engine = Engine(model, Tok())
    for prompt in prompts(4):
        expected = reference_generate(model, prompt, n, 40)
        got, masks = columns(engine, prompt, n, 40, temperature=0.0)
        assert got == expected
        assert all(m == [1] * 40 for m in masks)


def test_prepared_weights_give_the_same_tokens_and_training_models_are_refused():
    model = random_model()
    prepared = copy.deepcopy(model).prepare_for_inference()
    for prompt in prompts(3, seed=1):
        assert columns(Engine(prepared, Tok()), prompt, 2, 30, temperature=0.0)[0] == reference_generate(model, prompt, 2, 30)
    with pytest.raises(RuntimeError, match="eval mode"):
        copy.deepcopy(model).train().prepare_for_inference()
    assert all(p.requires_grad for p in model.parameters())


def test_decode_weights_follow_in_place_updates():
    model = random_model()
    engine = Engine(model, Tok())
    prompt = prompts(1)[0]
    columns(engine, prompt, 1, 5, temperature=0.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # an optimizer step would do this in place
    assert columns(engine, prompt, 1, 20, temperature=0.0)[0] == reference_generate(model, prompt, 1, 20)


@RECIPES
@pytest.mark.parametrize("n", [1, 8])
def test_a_tool_call_mid_stream_decodes_as_the_plain_loop(n, recipe):
    model = random_model(seed=3, recipe=recipe)
    done = 0
    for prompt in prompts(6, seed=2):
        ref = reference_generate(model, prompt, 1, 30)[0]
        start, end = ref[2], ref[6]
        if start == end or start in ref[:2] or end in ref[3:6]:
            continue
        tok = Tok(python_start=start, python_end=end, output_start=VOCAB - 1, output_end=VOCAB - 2)
        fast, fast_masks = columns(Engine(model, tok, tool=lambda e: "42!"), prompt, n, 30, temperature=0.0)
        slow, slow_masks = columns(Engine(plain(model), tok, tool=lambda e: "42!"), prompt, n, 30, temperature=0.0)
        assert fast == slow and fast_masks == slow_masks
        assert fast[0][7] == VOCAB - 1 and fast_masks[0][7:12] == [0] * 5 and fast_masks[0][12] == 1  # the tool's output, forced
        assert fast[0][:7] == ref[:7] and fast[0][12:] != ref[12:]  # then the model carries on from it
        done += 1
    assert done >= 2, "pick other seeds: too few prompts made a tool call"


def run_jobs(scheduler, jobs):
    texts = {id(j): [] for j in jobs}
    for job in jobs:
        job.emit = lambda d, k=id(job): texts[k].append(d)
        scheduler.submit(job)
    while scheduler.rows or scheduler.queue:
        scheduler.run_once()
    return [("".join(d.text for d in texts[id(j)]), texts[id(j)][-1].completion_tokens) for j in jobs]


def job(prompt, **kw):
    return Job(prompt, emit=None, max_tokens=kw.pop("max_tokens", 25), **kw)


@RECIPES
@pytest.mark.parametrize("compiled", [False, True])
def test_scheduler_rows_at_different_positions_match_the_plain_loop_and_each_alone(compiled, recipe):
    model = random_model(seed=4, recipe=recipe)
    ps = prompts(8, seed=4)
    fast = Scheduler(Engine(model, Tok(), compile=False), max_rows=8)
    if compiled:
        fast.engine.compiled = CompiledDecode(backend="aot_eager", min_len=64)
    together = run_jobs(fast, [job(p, temperature=0.0) for p in ps])
    slow = run_jobs(Scheduler(Engine(plain(model), Tok()), max_rows=8), [job(p, temperature=0.0) for p in ps])
    assert together == slow
    if compiled:
        assert fast.engine.compiled.failed is None
    alone = [run_jobs(Scheduler(Engine(model, Tok()), max_rows=8), [job(p, temperature=0.0)])[0] for p in ps[:3]]
    assert together[:3] == alone


@pytest.mark.parametrize("width", [64, 256])  # 256: the demo's width, where oneDNN may pick other kernels per batch
def test_a_seeded_sampled_row_is_the_same_alone_or_in_a_batch(width):
    model = random_model(seed=5, n_embd=width)
    ps = prompts(8, seed=5)
    settings = dict(temperature=0.9, top_k=50, top_p=0.95)
    alone = run_jobs(Scheduler(Engine(model, Tok()), max_rows=8), [job(ps[0], seed=7, **settings)])
    others = [job(p, seed=i, temperature=1.0) for i, p in enumerate(ps[1:])]
    batched = run_jobs(Scheduler(Engine(model, Tok()), max_rows=8), [*others[:3], job(ps[0], seed=7, **settings), *others[3:]])
    assert batched[3] == alone[0]


@RECIPES
def test_the_compiled_engine_gives_the_eager_tokens(recipe):
    model = random_model(seed=6, recipe=recipe)
    engine = Engine(model, Tok(), compile=False)
    compiled = Engine(model, Tok(), compile=False)
    compiled.compiled = CompiledDecode(backend="aot_eager", min_len=64)
    compiled.compiled_prefill = CompiledPrefill(backend="aot_eager", min_len=8)
    for prompt in prompts(3, seed=6):
        assert columns(compiled, prompt, 3, 30, temperature=0.0) == columns(engine, prompt, 3, 30, temperature=0.0)
    assert compiled.compiled.failed is None and compiled.compiled_prefill.failed is None


@RECIPES
def test_a_compiled_prefill_pads_the_prompt_but_returns_the_eager_logits_and_cache(recipe):
    model = random_model(seed=7, recipe=recipe)
    engine = Engine(model, Tok(), compile=False)
    prefill = CompiledPrefill(backend="aot_eager", min_len=8)
    for prompt in prompts(3, seed=7):
        logits, cache = engine.prefill(prompt)
        fast_logits, fast_cache = prefill(model, prompt, model.compute_dtype)
        n = len(prompt)
        assert fast_cache.pos == cache.pos == n and fast_cache.max_len >= n and fast_cache.max_len & (fast_cache.max_len - 1) == 0
        torch.testing.assert_close(fast_logits, logits)
        torch.testing.assert_close(fast_cache.k[..., :n, :], cache.k[..., :n, :])
        torch.testing.assert_close(fast_cache.v[..., :n, :], cache.v[..., :n, :])
    assert prefill(model, list(range(65)), model.compute_dtype) is None  # longer than the context: eager's error


def test_bf16_decode_follows_the_model_and_packed_matmuls_agree_with_f_linear():
    from picochat.model import DecodeWeights, _mkldnn_linear, packed_linear
    model = random_model(seed=7)
    model.compute_dtype = torch.bfloat16
    prompt = prompts(1, seed=7)[0]
    got = columns(Engine(copy.deepcopy(model).prepare_for_inference(), Tok()), prompt, 2, 10, temperature=0.0)[0]
    assert got[0] == got[1] and len(got[0]) == 10
    x = torch.randn(5, 64)
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(96, 64).to(dtype)
        if packed_linear(w):
            packed = _mkldnn_linear(x.to(dtype), torch.ops.mkldnn._reorder_linear_weight(w, 1))
            if dtype == torch.bfloat16:  # the same kernel as F.linear's: bitwise equal
                assert torch.equal(packed, torch.nn.functional.linear(x.to(dtype), w))
            else:  # another summation order: fp32 rounding apart (the greedy tests above pin the tokens)
                torch.testing.assert_close(packed, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
            assert DecodeWeights(model, dtype).linear is _mkldnn_linear
            assert DecodeWeights(model, dtype, packed=False).linear is torch.nn.functional.linear


def test_a_model_that_has_decoded_can_still_be_copied():
    model = random_model(seed=8)
    model.compute_dtype = torch.bfloat16
    model.prepare_for_inference()
    prompt = prompts(1, seed=8)[0]
    first = columns(Engine(model, Tok()), prompt, 1, 5, temperature=0.0)[0]
    assert columns(Engine(copy.deepcopy(model), Tok()), prompt, 1, 5, temperature=0.0)[0] == first
