"""
What a person sees of a reply (picochat/display.py, common.color_enabled): the '#### n' answer
marker hidden in `picochat chat` and in the API's text, streamed or not, however the text is cut
into pieces, while the tokens keep it (and the checkers read it: tests/test_tasks.py); ANSI colours
only on a terminal, and never with NO_COLOR. The chat runs on a stand-in engine that "samples" a
fixed reply, so no model runs.

    pytest -q tests/test_display.py
"""
from __future__ import annotations

import asyncio
import io
import json
import random
import sys
from argparse import Namespace
from types import SimpleNamespace

import pytest

from picochat.common import color_enabled
from picochat.display import DisplayStream, displayed_text
from picochat.scheduler import Delta
from picochat.serve.api import ReplyParts
from picochat.serve.app import stream_events
from picochat.stages.chat import Chat
from picochat.tokenizer import train_tokenizer

SHOWN = {  # a reply as the model wrote it -> as a person sees it
    "\n\n12 * 7 = 84\n#### 84": "\n\n12 * 7 = 84",
    "She has 18 apples.\n\n#### 18\n": "She has 18 apples.\n",
    "It costs $1,234.50\n####  $1,234.50  ": "It costs $1,234.50",
    "12 + 6 = 18 #### 18": "12 + 6 = 18",
    "First #### 3\nthen #### -4": "First\nthen",
    "#### 7": "",
    # not markers: a heading, a number with words after it, five '#'s, no number
    "#### Notes\nplain": "#### Notes\nplain",
    "#### 18 apples": "#### 18 apples",
    "##### 5": "##### 5",
    "####\n": "####\n",
    "Use # for comments: x = 1 # one": "Use # for comments: x = 1 # one",
}


def test_the_marker_line_is_hidden_and_headings_are_not():
    for raw, shown in SHOWN.items():
        assert displayed_text(raw) == shown, raw


def test_a_stream_cut_anywhere_shows_what_the_whole_text_shows():
    """Every reply above cut at every pair of points, and random texts of '#', digits, blanks and
    words cut at random: what DisplayStream lets through, joined, is displayed_text of the whole."""
    def streamed(pieces):
        stream = DisplayStream()
        return "".join(stream.feed(p) for p in pieces) + stream.finish()
    for raw in SHOWN:
        for i in range(len(raw) + 1):
            for j in range(i, len(raw) + 1):
                assert streamed([raw[:i], raw[i:j], raw[j:]]) == displayed_text(raw), (raw, i, j)
    rng = random.Random(0)
    alphabet = ["#", "#", "####", " ", "\n", "\t", "1", "8", ",", ".", "$", "-", "x", "#### 18"]
    for _ in range(3000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        cuts = sorted(rng.choices(range(len(raw) + 1), k=3))
        pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        assert streamed(pieces) == displayed_text(raw), (raw, pieces)


def test_a_stream_holds_back_only_what_may_still_be_a_marker():
    stream = DisplayStream()
    assert stream.feed("= 84") == "= 84"
    assert stream.feed("\n##") == ""          # could be the marker
    assert stream.feed("## 8") == ""
    assert stream.feed("4 apples") == "\n#### 84 apples"  # words after the number: not a marker
    assert stream.feed("\n#### 9") == "" and stream.feed("\nok") == "\nok"  # a marker, then a new line
    assert stream.finish() == ""


# -----------------------------------------------------------------------------
# Colours


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert color_enabled(Terminal()) and not color_enabled(io.StringIO()) and not color_enabled(object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not color_enabled(Terminal())
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: set and empty does not count
    assert color_enabled(Terminal())


# -----------------------------------------------------------------------------
# picochat chat


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is 12 times 7? Let me compute. 12 * 7 = 84\n#### 84 ok. " * 40], 300)


class SayingEngine:
    """Stands in for picochat.engine.Engine in Chat (with the fixture below standing in for
    scheduler.generate): every reply is `tokens`, then <|assistant_end|>."""

    def __init__(self, tok, tokens: list[int]):
        self.tokenizer, self.tokens = tok, tokens
        self.stop_tokens = {tok.encode_special("<|assistant_end|>")}
        self.model = SimpleNamespace(config=SimpleNamespace(sequence_len=256))

    def generate(self, prompt, **settings):
        for token in self.tokens + [self.tokenizer.encode_special("<|assistant_end|>")]:
            yield [token], [1]


@pytest.fixture(autouse=True)
def chat_samples_from_the_stand_in(monkeypatch):
    """Chat samples through scheduler.generate(engine, ...): the stand-in engine's tokens come out."""
    import picochat.stages.chat as chat_stage
    monkeypatch.setattr(chat_stage, "generate", lambda engine, prompt, **settings: engine.generate(prompt))


def tool_reply(tok) -> list[int]:
    """The Arithmetic task's reply: a calculator call, its output, the sum and the marker."""
    sp = tok.encode_special
    return ([sp("<|python_start|>"), *tok.encode("12 * 7"), sp("<|python_end|>"), sp("<|output_start|>"),
             *tok.encode("84"), sp("<|output_end|>"), *tok.encode("\n\n12 * 7 = 84\n#### 84")])


def ask(tok, tokens, plain=False) -> Chat:
    chat = Chat(SayingEngine(tok, tokens), Namespace(max_tokens=64, temperature=0.0, top_k=50, seed=42, plain=plain,
                                                       frequency_penalty=0.0, presence_penalty=0.0))
    chat.reply("What is 12 times 7?")
    return chat


def test_chat_shows_the_answer_without_the_marker_and_the_history_keeps_it(tok, capsys):
    reply = tool_reply(tok)
    assert sum(t in tok.encode("#### 84") for t in reply) > 1  # the marker comes in several tokens
    chat = ask(tok, reply)
    out = capsys.readouterr().out  # captured: not a terminal, as in `picochat chat -p Hi | cat`
    assert out == "Assistant: \n[python] 12 * 7\n\n[output] 84\n\n\n12 * 7 = 84\n"
    assert "\033" not in out
    assert tok.decode(chat.history).endswith("12 * 7 = 84\n#### 84<|assistant_end|>")  # what the model sees


def test_chat_colours_a_terminal_unless_no_color_or_plain(tok, monkeypatch):
    reply = tok.encode("It is 84.\n#### 84")
    for no_color, plain, coloured in ((None, False, True), ("1", False, False), ("", False, True), (None, True, False)):
        if no_color is None:
            monkeypatch.delenv("NO_COLOR", raising=False)
        else:
            monkeypatch.setenv("NO_COLOR", no_color)
        monkeypatch.setattr("sys.stdout", Terminal())
        ask(tok, reply, plain=plain)
        out = sys.stdout.getvalue()
        assert ("\033[1mAssistant: \033[0m" in out) == coloured and ("\033" in out) == coloured
        assert out.endswith("It is 84.\n")


# -----------------------------------------------------------------------------
# The API's text


def test_reply_parts_hide_the_marker_split_across_deltas_and_before_a_tool_block():
    reply = ReplyParts()
    deltas = [d for piece in ("So 84", "\n#", "##", "# 8", "4") for d in reply.feed(piece)]
    deltas += reply.feed(marker="<|python_start|>")  # the text before a tool block ends there
    deltas += reply.feed("1+1") + reply.feed(marker="<|python_end|>") + reply.feed("Then 2.\n#### 2") + reply.flush()
    assert "".join(d.get("content", "") for d in deltas) == "So 84Then 2."
    assert reply.content == "So 84Then 2." and [p["type"] for p in reply.parts] == ["text", "python", "text"]
    raw = ReplyParts(show_answer_marker=True)
    for piece in ("So 84", "\n#", "##", "# 8", "4"):
        raw.feed(piece)
    assert raw.flush() == [] and raw.content == "So 84\n#### 84"


def test_streamed_events_send_the_held_back_text_before_the_finish_chunk():
    async def events(replies):
        queue = asyncio.Queue()
        for delta in (Delta(0, "12 * 7 = 84"), Delta(0, "\n\n"), Delta(0, "###"), Delta(0, "# 8"), Delta(0, "4"),
                      Delta(0, finish_reason="stop", completion_tokens=5)):
            queue.put_nowait(delta)
        return [line async for line in stream_events(SimpleNamespace(n=1), queue, replies, "id", "tiny", 3, False)]
    for replies, text in (([ReplyParts()], "12 * 7 = 84"), ([ReplyParts(show_answer_marker=True)], "12 * 7 = 84\n\n#### 84")):
        chunks = [json.loads(line[6:]) for line in asyncio.run(events(replies)) if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
