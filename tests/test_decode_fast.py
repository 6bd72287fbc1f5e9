"""
The one decode path (picochat/decode.py's forward over prepared weights, driven by the Scheduler)
against the slow, obvious loop (picochat.engine.reference_generate: the model's training forward over
the whole sequence, one token at a time) and against an engine whose logits come from that forward
(PlainEngine); the compiled path (CompiledDecode / CompiledPrefill, via torch.compile's aot_eager
backend on CPU) against eager. All fp32 on CPU, tiny random models.

    pytest -q tests/test_decode_fast.py
"""
from __future__ import annotations

import copy
import json

import picochat.decode
from pathlib import Path

import pytest
import torch

from picochat.decode import CompiledDecode, CompiledPrefill, DecodeWeights, _mkldnn_linear, decode_weights, packed_linear
from picochat.engine import Engine, reference_generate
from picochat.model import GPT, GPTConfig
from picochat.recipe import model_parts
from picochat.scheduler import Job, Scheduler, generate, generate_batch, run_to_completion

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


class PlainEngine(Engine):
    """The logits faked at the engine: every call runs the model's training forward over each row's
    whole sequence (read back from the cache's token record), no keys or values cached."""

    def forward(self, ids, cache, masked=True):
        out = []
        for b in range(ids.size(0)):
            n, T = cache.lengths[b], ids.size(1)
            cache.tokens[b, n:n + T] = ids[b]
            with torch.no_grad():
                out.append(self.model(cache.tokens[b:b + 1, :n + T])[0, -1])
            cache.lengths[b] = n + T
        return torch.stack(out)


def prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def columns(engine, prompt, n, max_tokens, **kw):
    out = [(col, mask) for col, mask in generate(engine, prompt, num_samples=n, max_tokens=max_tokens, **kw)]
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
        slow, slow_masks = columns(PlainEngine(model, tok, tool=lambda e: "42!"), prompt, n, 30, temperature=0.0)
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
    slow = run_jobs(Scheduler(PlainEngine(model, Tok()), max_rows=8), [job(p, temperature=0.0) for p in ps])
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
    w = decode_weights(model, packed=False)
    for prompt in prompts(3, seed=7):
        logits, cache = engine.prefill(prompt)
        fast_logits, fast_cache = prefill(w, prompt, model.config, "cpu", torch.float32)
        n = len(prompt)
        assert fast_cache.lengths[0] == cache.lengths[0] == n and fast_cache.max_len & (fast_cache.max_len - 1) == 0
        torch.testing.assert_close(fast_logits, logits)
        torch.testing.assert_close(fast_cache.k[..., :n, :], cache.k[..., :n, :])
        torch.testing.assert_close(fast_cache.v[..., :n, :], cache.v[..., :n, :])
    assert prefill(w, list(range(65)), model.config, "cpu", torch.float32) is None  # past the context: eager's error


def test_the_compiled_step_keeps_a_graph_per_bucket_past_the_compilers_limit(monkeypatch):
    """A cache of 2 rows x 128 positions with 8-position buckets has 2 x 5 = 10 step buckets, more
    than torch.compile's default limit of 8 graphs per function: every one must still run
    compiled (no fallback to eager), and give the eager tokens."""
    model = random_model(seed=9)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(1)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setitem(picochat.decode._GRAPHS, "allowed", 0)
    # torch's default limit, as in a fresh process (config.patch restores the setting after; a
    # monkeypatch of the config module deletes the setting on undo)
    with torch._dynamo.config.patch(recompile_limit=8):
        limit = torch._dynamo.config.recompile_limit
        eager, compiled = Engine(model, Tok()), Engine(model, Tok())
        compiled.compiled = CompiledDecode(backend=counting, min_len=8)
        for rows in (1, 2):
            ps = prompts(rows, seed=rows)
            jobs = lambda: [job(p, temperature=0.0, max_tokens=70) for p in ps]  # noqa: E731 (past 64: 5 lengths)
            got = run_jobs(Scheduler(compiled, max_rows=2, max_len=128), jobs())
            assert got == run_jobs(Scheduler(eager, max_rows=2, max_len=128), jobs())
    assert compiled.compiled.failed is None
    assert len(graphs) == 10 > limit


def test_a_full_cache_is_an_error_before_anything_is_written():
    engine = Engine(random_model(), Tok())
    cache = engine.new_cache(1, 4)
    cache.rows = 1
    with pytest.raises(RuntimeError, match="KV cache full"):
        engine.forward(torch.zeros((1, 5), dtype=torch.long), cache)
    assert cache.lengths[0] == 0


def test_bf16_decode_follows_the_model_and_packed_matmuls_agree_with_f_linear():
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


GOLDEN = Path(__file__).parent / "fixtures" / "decode_golden.json"


def golden_outputs(recipe):
    """Greedy and seeded outputs at 1 and 8 rows, with tool calls mid-stream (the tool tokens'
    head rows are scaled up so the model calls the tool often), through generate_batch (chat, the
    base model's samples) and run_to_completion (the server's loop, chat_eval, RL rollouts)."""
    model = random_model(seed=3, recipe=recipe)
    with torch.no_grad():
        for token, scale in ((250, 6.0), (251, 6.0), (254, 3.0)):
            model.lm_head.weight[token] *= scale
    tok = Tok(python_start=250, python_end=251, output_start=252, output_end=253, assistant_end=254, bos=255)
    tool = lambda code: "4" + str(len(code) % 10)  # noqa: E731
    engine, out = Engine(model, tok, tool=tool), {}
    for name, kw in [("greedy", dict(temperature=0.0)), ("seeded", dict(temperature=1.0, top_k=40, seed=11))]:
        for n in (1, 8):
            out[f"engine_{name}_{n}"] = [list(generate_batch(engine, p, n, max_tokens=40, **kw)) for p in prompts(3, seed=5)]
    for name, kw in [("greedy", dict(temperature=0.0)), ("seeded", dict(temperature=1.0, top_k=40, top_p=0.9))]:
        jobs = [Job(p, emit=None, n=2, max_tokens=30, seed=100 + i, keep_tokens=True, **kw)
                for i, p in enumerate(prompts(6, seed=9))]
        results = run_to_completion(Scheduler(Engine(model, tok, tool=tool), max_rows=8, max_queue=64), jobs)
        out[f"sched_{name}"] = [[[c.tokens, c.sampled, c.finish_reason] for c in choices] for choices in results]
    return json.loads(json.dumps(out))  # tuples as lists, as in the file


@RECIPES
def test_outputs_equal_those_recorded_before_the_one_decode_path(recipe):
    """Recorded with the code before picochat/decode.py (two caches, two forwards, two loops) and
    equal to it token for token."""
    got, recorded = golden_outputs(recipe), json.loads(GOLDEN.read_text())[recipe]
    assert sum(json.dumps(v).count("250, ") for v in recorded.values()) > 20  # tool calls were made
    for key in recorded:
        assert got[key] == recorded[key], key
