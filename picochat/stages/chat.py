"""
`picochat chat`: talk to a model in the terminal (docs/DESIGN.md#cli-and-server).

The whole conversation is kept as messages, rendered into the prompt the way `picochat serve`
renders it, and the reply streams as it is sampled. Tool calls show up as `[python] expr` and their
results as `[output] ...`, dimmed, apart from the reply's text. The reply's text is shown without
the '#### n' answer marker of the math tasks (picochat/display.py); the history keeps the tokens as
sampled. Colours only on a terminal, and not with NO_COLOR set (common.color_enabled; --plain turns
them off too). A reply cut off at --max-tokens is closed with <|assistant_end|> in the history so
the next turn starts cleanly.

    picochat chat                                  # the only SFT model, its latest step
    picochat chat --source base -p "The capital of France is"
    picochat chat -p "What is 12*7?" -t 0          # one answer, greedy, then exit

In the loop: /clear starts over, /help lists the commands, quit or exit (or Ctrl-D) leaves;
Ctrl-C stops a reply midway.
"""
from __future__ import annotations

import sys

import torch

from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args
from picochat.common import (TRAINING_STAGES, PicochatError, color_enabled, dist_info,
                             resolve_device, styled)
from picochat.display import DisplayStream
from picochat.decode import decode_dtype
from picochat.engine import Engine, StreamDecoder
from picochat.scheduler import generate
from picochat.tokenizer import get_tokenizer

HELP = """commands:
  /clear       forget the conversation and start a new one
  /help        show this
  quit, exit   leave (Ctrl-D too)"""


def build_parser() -> Parser:
    p = Parser("chat", "Chat with a trained model in the terminal, interactively or one prompt with -p.")
    p.add_argument("--source", default="sft", choices=list(TRAINING_STAGES), help="which stage's checkpoint")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt, then exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 is greedy")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42, help="sampling seed; reply i uses seed + i")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a token's count in the reply so far from its logit (OpenAI's; -2..2)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token the reply has used (OpenAI's; -2..2)")
    add_device_args(p)
    p.add_argument("--plain", action="store_true", help="no ANSI colours, even on a terminal")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.temperature < 0 or args.max_tokens < 1:
        raise PicochatError(f"need --temperature >= 0 and --max-tokens >= 1, "
                            f"got {args.temperature} and {args.max_tokens}")
    if not (abs(args.frequency_penalty) <= 2 and abs(args.presence_penalty) <= 2):
        raise PicochatError(f"--frequency-penalty and --presence-penalty must be in [-2, 2], "
                            f"got {args.frequency_penalty} and {args.presence_penalty}")
    device = resolve_device(args.device, dist_info())
    tokenizer = get_tokenizer()
    model, meta = load_model(args.source, args.model_tag or None, device,
                             step=None if args.step < 0 else args.step,
                             compute_dtype=torch.float32, tokenizer=tokenizer)
    model.compute_dtype = decode_dtype(model, args.dtype, device)  # 'auto' on a CPU: measured
    chat = Chat(Engine(model.prepare_for_inference(), tokenizer), args)
    if args.prompt:
        chat.reply(args.prompt)
        return 0
    print(f"picochat {args.source} model {meta['model_tag']} step {meta['step']}. /help for commands, quit to leave.")
    while True:
        try:
            text = input(chat.style("bold", "\nUser: ")).strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: a normal exit
            print()
            return 0
        if text in ("quit", "exit", "/quit", "/exit"):
            return 0
        if text == "/clear":
            chat.clear()
            print("(conversation cleared)")
        elif text == "/help":
            print(HELP)
        elif text:
            chat.reply(text)


class Chat:
    """The conversation so far, as messages, and how one reply is sampled and shown. The prompt is
    the conversation rendered by `tokenizer.render_for_completion`, exactly as `picochat serve`
    renders it, and it must leave room for a reply in the model's context (sequence_len)."""

    def __init__(self, engine: Engine, args):
        self.engine, self.args = engine, args
        self.color = not args.plain and color_enabled(sys.stdout)
        tok = engine.tokenizer
        self.special = {name: tok.encode_special(name) for name in
                        ("<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                         "<|output_end|>")}
        self.clear()

    def clear(self):
        self.messages: list[dict] = []
        self.turns = 0

    @property
    def history(self) -> list[int]:
        """The conversation as the model sees it: <|bos|>, then every turn."""
        if not self.messages:
            return [self.engine.tokenizer.bos_id]
        return self.engine.tokenizer.render_conversation({"messages": self.messages}, max_tokens=sys.maxsize)[0]

    def style(self, name: str, text: str) -> str:
        return styled(text, name, self.color)

    def reply(self, text: str) -> None:
        """Add the user's turn, stream the assistant's reply to stdout, add it to the history."""
        tok = self.engine.tokenizer
        user = {"role": "user", "content": text}
        prompt = tok.render_for_completion({"messages": self.messages + [user]})
        context = self.engine.model.config.sequence_len
        if len(prompt) >= context:  # the user's turn is not kept: the history stays usable
            print(f"the conversation is {len(prompt)} tokens, at the model's context of {context}; "
                  f"/clear to start over")
            return
        print(self.style("bold", "Assistant: "), end="", flush=True)
        stream = StreamDecoder(tok)
        self.block = None  # inside a tool call ("dim") or a tool output ("cyan")
        self.display = DisplayStream()  # the reply's text as a person sees it
        reply_tokens, ended = [], False
        columns = generate(self.engine, prompt, max_tokens=min(self.args.max_tokens, context - len(prompt)),
                           temperature=self.args.temperature, top_k=self.args.top_k or None,
                           seed=self.args.seed + self.turns,
                           frequency_penalty=self.args.frequency_penalty,
                           presence_penalty=self.args.presence_penalty)
        try:
            for token_column, _ in columns:
                token = token_column[0]
                if token in self.engine.stop_tokens:
                    ended = True
                    break
                reply_tokens.append(token)
                self.show(token, stream)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the whole chat
            pass
        rest = stream.flush()
        print(rest if self.block else self.display.feed(rest) + self.display.finish())
        # The history always holds well-formed turns: a reply that was cut, or that ended with
        # <|bos|> (the model starting a new document), is closed with <|assistant_end|> when rendered.
        self.messages += [user, {"role": "assistant", "content": self.reply_parts(reply_tokens)}]
        self.turns += 1
        if not ended:
            print(self.style("dim", f"(reply cut after {len(reply_tokens)} tokens)"))

    def reply_parts(self, tokens: list[int]) -> list[dict]:
        """The reply's tokens as the content parts render_conversation takes: text, python (a tool
        call) and python_output (its result)."""
        s, decode = self.special, self.engine.tokenizer.decode
        kind_after = {s["<|python_start|>"]: "python", s["<|output_start|>"]: "python_output",
                      s["<|python_end|>"]: "text", s["<|output_end|>"]: "text"}
        parts, kind, run = [], "text", []
        for token in tokens + [None]:
            if token is None or token in kind_after:
                if run or kind != "text":
                    parts.append({"type": kind, "text": decode(run)})
                kind, run = kind_after.get(token, "text"), []
            else:
                run.append(token)
        return parts

    def show(self, token: int, stream: StreamDecoder) -> None:
        """Print one token of the reply; a tool call and its output go on lines of their own,
        labelled and coloured, so they can't be mistaken for the model's words."""
        s = self.special
        if token in (s["<|python_start|>"], s["<|output_start|>"]):
            self.block = "dim" if token == s["<|python_start|>"] else "cyan"
            label = "[python] " if token == s["<|python_start|>"] else "[output] "
            text = self.display.feed(stream.flush()) + self.display.finish() + "\n" + self.style(self.block, label)
        elif token in (s["<|python_end|>"], s["<|output_end|>"]):
            text = self.style(self.block or "dim", stream.flush()) + "\n"
            self.block = None
        else:
            text = stream.feed(token)
            if not self.block:
                text = self.display.feed(text)
            elif text:
                text = self.style(self.block, text)
        sys.stdout.write(text)
        sys.stdout.flush()
