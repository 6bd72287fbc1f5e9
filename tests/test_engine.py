"""
Tests for picochat/engine.py and the `picochat chat` stage.

Models are tiny GPTs with random weights (the zero-initialized head and projections perturbed so the
logits mean something), and for exact scenarios engines whose logits are faked at Engine.forward:
one that follows a script (after token a comes script[a]) and one that is uniform. Both still run
the real forward first, so the cache is exercised either way. The tokenizer is a 300-token BPE
trained here.

    pytest -q tests/test_engine.py
"""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from picochat.__main__ import main as picochat_main
from picochat.checkpoint import save_checkpoint
from picochat.common import checkpoint_dir, tokenizer_dir
from picochat.engine import Engine, StreamDecoder, sample_rows
from picochat.model import GPT, GPTConfig
from picochat.scheduler import generate, generate_batch
from picochat.stages.chat import Chat
from picochat.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. What is 6*7? It is 42, ok. Error: division by "
        "zero. Tokyo is 東京 and the weather is 天気. Smile 😀 and world 🌍 and ñ. ") * 40


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], 300)


def tiny_config(tok, sequence_len=32) -> GPTConfig:
    # n_kv_head < n_head so the cache copy is checked with grouped-query attention too
    return GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=2, n_head=2,
                     n_kv_head=1, n_embd=32)


def random_model(model_cls=GPT, config=None, **kwargs):
    model = model_cls(config, **kwargs)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the head and output projections start at zero: make every layer count
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


class ScriptedEngine(Engine):
    """Runs the real forward, then answers with one-hot-ish logits: after token a comes script[a]
    (anything unscripted is followed by `default`). Records the (rows, tokens) of every forward."""

    def __init__(self, config, tok, script: dict[int, int], default: int, **kwargs):
        super().__init__(random_model(config=config), tok, **kwargs)
        self.script, self.default, self.calls = script, default, []

    def forward(self, ids, cache, masked=True):
        logits = super().forward(ids, cache, masked)
        self.calls.append(tuple(ids.shape))
        nxt = torch.tensor([self.script.get(t, self.default) for t in ids[:, -1].tolist()])
        return torch.full_like(logits, -10.0).scatter_(-1, nxt.unsqueeze(-1), 10.0)


class UniformEngine(Engine):
    def __init__(self, config, tok, **kwargs):
        super().__init__(random_model(config=config), tok, **kwargs)

    def forward(self, ids, cache, masked=True):
        return torch.zeros_like(super().forward(ids, cache, masked))


def sample_next_token(logits, generator, temperature=1.0, top_k=None, top_p=None):
    rows = logits.size(0)
    return sample_rows(logits, torch.full((rows,), float(temperature)), torch.full((rows,), top_k or 0),
                       torch.full((rows,), 1.0 if top_p is None else top_p),
                       torch.rand(rows, generator=generator, device=generator.device))


def chat_prompt(tok, text="What is 6*7?"):
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


def tool_script(tok, expr="6*7", after=" ok"):
    """A script in which the model calls the tool on `expr`, then says `after` and ends."""
    sp = tok.encode_special
    chain = ([sp("<|assistant_start|>"), sp("<|python_start|>")] + tok.encode(expr)
             + [sp("<|python_end|>")])
    tail = [sp("<|output_end|>")] + tok.encode(after) + [sp("<|assistant_end|>")]
    script = dict(zip(chain, chain[1:])) | dict(zip(tail, tail[1:]))
    assert len(script) == len(chain) + len(tail) - 2, "the script's tokens must be distinct"
    return script


# -----------------------------------------------------------------------------
# Sampling and the KV cache


def test_greedy_with_kv_cache_equals_greedy_by_full_forwards(tok):
    model = random_model(config=tiny_config(tok))
    prompt = chat_prompt(tok)
    expected, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(20):
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
            expected.append(token)
            ids.append(token)
    engine = Engine(model, tok, tool=lambda expr: "")
    columns = [col for col, _ in generate(engine, prompt, num_samples=3, max_tokens=20, temperature=0)]
    stops = {tok.bos_id, tok.encode_special("<|assistant_end|>"), tok.encode_special("<|python_start|>")}
    assert not stops & set(expected), "pick another seed: the reference has no stop or tool logic"
    assert [col[0] for col in columns] == expected
    assert all(col == [col[0]] * 3 for col in columns)


def test_the_prompt_is_prefilled_once_then_decoded_one_token_per_row(tok):
    script = tool_script(tok)
    engine = ScriptedEngine(tiny_config(tok), tok, script, default=tok.encode_special("<|assistant_end|>"), tool=lambda expr: "42")
    prompt = chat_prompt(tok)
    list(generate(engine, prompt, num_samples=4, max_tokens=6))
    assert engine.calls == [(1, len(prompt))] + [(4, 1)] * 5


def test_samples_differ_from_the_first_token_on(tok):
    engine = UniformEngine(tiny_config(tok), tok)
    first = next(generate(engine, chat_prompt(tok), num_samples=8, temperature=1.0))[0]
    assert len(set(first)) > 1  # all 8 equal under uniform logits: probability 300^-7


def test_same_seed_same_samples_other_seed_other_samples(tok):
    engine = UniformEngine(tiny_config(tok), tok, tool=lambda expr: "")
    run = lambda seed: generate_batch(engine, chat_prompt(tok), 4, max_tokens=10, temperature=1.0, seed=seed)
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, gen, temperature=0), greedy)
    assert torch.equal(sample_next_token(logits, gen, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next_token(logits, gen, temperature=1.0, top_p=1e-6), greedy)
    # nucleus keeps the top tokens up to p: with two dominant tokens only those are ever drawn
    two = torch.full((1, 50), -20.0)
    two[0, 3], two[0, 9] = 5.0, 5.0
    draws = {sample_next_token(two.expand(200, -1), gen, 1.0, top_p=0.9)[i].item() for i in range(200)}
    assert draws == {3, 9}


def test_max_tokens_and_the_rotary_table_bound_the_reply(tok):
    word = tok.encode(" ok")[0]
    engine = ScriptedEngine(tiny_config(tok, sequence_len=16), tok, {}, default=word)
    prompt = chat_prompt(tok)
    assert len(list(generate(engine, prompt, num_samples=2, max_tokens=5))) == 5
    # default: fill the training context (sequence_len 16), here shorter than the prompt + 5
    long_prompt = [tok.bos_id] + [word] * 9
    assert len(list(generate(engine, long_prompt))) == 16 - 10
    # the rotary table (10 x sequence_len = 160) is the hard limit: 158 + 3 - 1 positions are fed
    results, _ = generate_batch(engine, [tok.bos_id] * 158, max_tokens=50)
    assert len(results[0]) == 158 + 3
    with pytest.raises(ValueError, match="limit is 160"):
        list(generate(engine, [tok.bos_id] * 161))


def test_penalties_steer_a_reply_away_from_the_tokens_it_sampled(tok):
    """OpenAI's frequency and presence penalties: with every logit equal, greedy decoding repeats
    the first token for ever; with either penalty each sampled token is pushed below the others,
    so the reply never repeats one (until every token was used)."""
    engine = UniformEngine(tiny_config(tok), tok)
    run = lambda **kw: generate_batch(engine, chat_prompt(tok), max_tokens=12, temperature=0.0, **kw)[0][0]  # noqa: E731
    prompt = chat_prompt(tok)
    assert len(set(run()[len(prompt):])) == 1
    for kw in (dict(frequency_penalty=0.5), dict(presence_penalty=0.5)):
        reply = run(**kw)[len(prompt):]
        assert len(reply) == 12 and len(set(reply)) == 12, kw
    assert len(set(run(frequency_penalty=-0.5)[len(prompt):])) == 1  # negative: repeat all the more


# -----------------------------------------------------------------------------
# Tool use


def test_tool_output_is_forced_after_python_end_with_mask_0(tok):
    sp = tok.encode_special
    calls = []
    engine = ScriptedEngine(tiny_config(tok), tok, tool_script(tok), default=sp("<|assistant_end|>"),
                            tool=lambda expr: calls.append(expr) or "42")
    prompt = chat_prompt(tok)
    columns = list(generate(engine, prompt, num_samples=2, max_tokens=64, temperature=0))
    call = [sp("<|python_start|>")] + tok.encode("6*7") + [sp("<|python_end|>")]
    output = [sp("<|output_start|>")] + tok.encode("42") + [sp("<|output_end|>")]
    after = tok.encode(" ok") + [sp("<|assistant_end|>")]
    assert [col[0] for col, _ in columns] == call + output + after
    assert [m[0] for _, m in columns] == [1] * len(call) + [0] * len(output) + [1] * len(after)
    assert all(col[0] == col[1] for col, _ in columns)  # both rows made the call
    assert calls == ["6*7", "6*7"]
    results, masks = generate_batch(engine, prompt, 2, max_tokens=64, temperature=0)
    assert results[0] == prompt + call + output + after[:-1]  # without the terminal token
    assert masks[0] == [0] * len(prompt) + [1] * len(call) + [0] * len(output) + [1] * (len(after) - 1)


@pytest.mark.parametrize("tool", [lambda expr: "Error: division by zero",
                                  lambda expr: 1 / 0])  # a buggy tool that raises
def test_generation_goes_on_after_a_tool_error(tok, tool):
    sp = tok.encode_special
    engine = ScriptedEngine(tiny_config(tok), tok, tool_script(tok, expr="1/0"), default=sp("<|assistant_end|>"), tool=tool)
    results, masks = generate_batch(engine, chat_prompt(tok), max_tokens=64, temperature=0)
    text = tok.decode(results[0])
    assert "<|python_end|><|output_start|>Error: " in text
    assert "division by zero<|output_end|> ok" in text


# -----------------------------------------------------------------------------
# Streaming text


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "Smile 😀 and world 🌍, 東京の天気 and ñ 😀🌍"
    ids = tok.encode(text)
    pieces_per_token = [tok.id_to_bytes(t).decode("utf-8", errors="replace") for t in ids]
    assert any("\ufffd" in p for p in pieces_per_token), "the test needs characters split over tokens"
    stream = StreamDecoder(tok)
    pieces = [stream.feed(t) for t in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # held back while a character was unfinished
    cut = StreamDecoder(tok)
    assert "\ufffd" not in cut.feed(ids[:-1]) and cut.flush() in ("", "\ufffd")


# -----------------------------------------------------------------------------
# picochat chat


def chat_args(**overrides):
    args = dict(max_tokens=64, temperature=0.0, top_k=50, seed=42, plain=True, frequency_penalty=0.0,
                presence_penalty=0.0)
    return Namespace(**(args | overrides))


def test_chat_shows_tool_calls_and_keeps_well_formed_history(tok, capsys):
    sp = tok.encode_special
    chat = Chat(ScriptedEngine(tiny_config(tok), tok, tool_script(tok), default=sp("<|assistant_end|>"),
                               tool=lambda expr: "42"), chat_args())
    chat.reply("What is 6*7?")
    out = capsys.readouterr().out
    assert "Assistant: \n[python] 6*7\n\n[output] 42\n ok" in out
    assert tok.decode(chat.history) == ("<|bos|><|user_start|>What is 6*7?<|user_end|><|assistant_start|>"
                                        "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"
                                        " ok<|assistant_end|>")
    chat.clear()
    assert chat.history == [tok.bos_id]


def test_chat_shows_the_answer_of_a_tool_a_user_added(tok, capsys, monkeypatch):
    import picochat.toolbox as toolbox
    from serve_fixtures import tool_calling_engine  # a model that calls a tool by a plan
    monkeypatch.setattr(toolbox, "TOOLS", dict(toolbox.TOOLS))
    toolbox.add_tool(toolbox.Tool("shout", "the text in capitals", str.upper))
    engine = tool_calling_engine(random_model(config=tiny_config(tok, sequence_len=64)), tok, 'shout("ok")', " ok", None)
    Chat(engine, chat_args()).reply("Shout ok.")  # tool None: the engine's default, the registry
    assert '[python] shout("ok")\n\n[output] OK\n ok' in capsys.readouterr().out


def test_chat_closes_a_cut_reply_with_assistant_end(tok, capsys):
    word = tok.encode(" ok")[0]
    chat = Chat(ScriptedEngine(tiny_config(tok), tok, {}, default=word), chat_args(max_tokens=3))
    chat.reply("hi")
    assert chat.history[-4:] == [word] * 3 + [tok.encode_special("<|assistant_end|>")]
    assert "(reply cut after 3 tokens)" in capsys.readouterr().out


def test_chat_renders_like_serve_and_refuses_a_conversation_past_the_context(tok, capsys):
    word = tok.encode(" ok")[0]
    chat = Chat(ScriptedEngine(tiny_config(tok, sequence_len=32), tok, {}, default=word), chat_args(max_tokens=50))
    chat.reply("hi")  # the reply is cut where prompt + reply fill the context, as picochat serve cuts it
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    assert chat.history[:len(prompt)] == prompt
    assert len(chat.history) == 32 + 1  # + the <|assistant_end|> that closes the cut reply
    chat.clear()
    chat.reply("hi " * 40)
    assert "at the model's context of 32" in capsys.readouterr().out and chat.messages == []


@pytest.fixture
def tiny_checkpoint(home, tok):
    """A tokenizer and an SFT checkpoint in a temporary PICOCHAT_HOME, as the stages write them."""
    tok.save(tokenizer_dir())
    config = tiny_config(tok, sequence_len=64)
    model = random_model(config=config)
    meta = {"step": 3, "model_config": config.to_dict(), "user_config": {"model_tag": "tiny"},
            "compute_dtype": "float32"}
    save_checkpoint(checkpoint_dir("sft", "tiny"), 3, model.state_dict(), meta, rank_state={})
    return home


def test_chat_one_shot_prompt_end_to_end(tiny_checkpoint, capsys):
    rc = picochat_main(["chat", "-p", "What is 6*7?", "--device", "cpu", "--dtype", "float32",
                        "--max-tokens", "12", "--plain"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("Assistant: ") and len(out.strip()) > len("Assistant:")
    assert "\033[" not in out


def test_chat_interactive_loop_end_to_end(tiny_checkpoint, capsys, monkeypatch):
    lines = iter(["hello", "/help", "/clear", "hi again", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc = picochat_main(["chat", "--device", "cpu", "--dtype", "float32", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model tiny step 3" in out and "/clear" in out and "(conversation cleared)" in out
    assert out.count("Assistant: ") == 2


def test_chat_without_a_checkpoint_is_a_one_line_error(home, tok, capsys):
    tok.save(tokenizer_dir())
    rc = picochat_main(["chat", "--source", "mid", "-p", "hi", "--device", "cpu", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("picochat chat: error: no mid checkpoints in") and err.count("\n") == 1
