"""
The OpenAI chat-completions schema, as picochat speaks it: request validation with nanochat's
limits (docs/DESIGN.md#cli-and-server), messages to a token prompt, and the JSON shapes of replies, chunks and errors.
No HTTP here (that is picochat/serve/app.py), so every rule is testable as a plain function.

Limits, each a 400 naming the limit and the value seen: at most 500 messages, 8,000 characters per
message and 32,000 in all, no empty message; roles user and assistant, alternating, starting and
ending with user, and one optional leading system message (prepended to the first user message:
the model has no system role); temperature in [0, 2], top_k in [1, 200] (0: no top-k),
top_p in (0, 1], frequency_penalty and presence_penalty in [-2, 2] (OpenAI's meaning, counted over
the tokens the reply sampled), max_tokens in [1, 4096], n in [1, 8], at most 4 stop strings; the prompt plus
max_tokens must fit the model's context.

Tool calls are structure, never text (docs/SERVING.md#tool-calls): a reply's tool blocks, opened
and closed by the model's real special tokens, come out as parts of their own ("python", the call;
"python_output", the tool's answer) beside the text (`ReplyParts`), and go back in as such parts of
an assistant message's content list. Text, anywhere, is only ever text: a reply or a tool output
that spells "<|output_end|>" cannot end a tool block on a page or become a special token.

A reply's text is what a person sees (picochat/display.py): the '#### 18' answer marker that the
math tasks train is cut from `content`, text parts and text deltas (held back while streaming until
it is decided), unless the request asks for `show_answer_marker` (an eval harness that grades the
marker itself; picochat's extension, like top_k 0).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from picochat.display import DisplayStream

# nanochat's abuse limits (docs/DESIGN.md#cli-and-server)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty, as OpenAI bounds them
MAX_TOKENS = 4096
MAX_N = 8
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each; checking a stop string costs its length per token, on the engine's thread
MAX_BODY_BYTES = 1 << 20  # a request at every limit above is ~130 KB of JSON

TOOL_PARTS = ("python", "python_output")  # the model's tool call, the tool's answer
OPENS = {"<|python_start|>": "python", "<|output_start|>": "python_output"}  # special tokens -> part
CLOSES = {"<|python_end|>": "python", "<|output_end|>": "python_output"}


class InvalidRequest(Exception):
    """A request we refuse; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def shown(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut to `limit` characters (a body may hold 1 MB in one field)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Defaults:
    """What a request gets for the settings it leaves out (picochat serve's flags; top_k 0: none)."""
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class ChatRequest:
    messages: list[dict]  # in picochat.tokenizer's conversation format
    stream: bool = False
    n: int = 1
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int | None = None  # None: the server's default, cut to what the context has left
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    show_answer_marker: bool = False  # picochat's extension: the reply's text with its '#### n' line


# -----------------------------------------------------------------------------
# Validation


def _number(body: dict, name: str, default, low, high, integer: bool, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))  # an int is finite (and may be huge)
            or (integer and value != int(value))):
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"{name} must be {kind}, got {shown(value)}", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"{name} must be in {interval}, got {value}", name)
    return int(value) if integer else float(value)


def _content_text(content, where: str) -> str:
    """A message's content as one string: a string, or OpenAI's list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                     f"are supported, got {str(part)[:80]}", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"{where}.content must be a string, got {type(content).__name__}", f"{where}.content")


def parse_assistant_content(content, where: str = "messages[i]") -> str | list[dict]:
    """An assistant message's content -> picochat content. A string is text, whatever it spells:
    "<|python_start|>" in it is seven ordinary tokens, never the special one. A list of parts may
    hold the reply's tool parts ({"type": "python" | "python_output", "text": ...}, as the server
    returned them) beside text parts; adjacent text parts are joined, and all-text is a string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts, got {type(content).__name__}",
                             f"{where}.content")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", *TOOL_PARTS) or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}.content: an assistant's parts are {{\"type\": \"text\", \"python\" or "
                                 f"\"python_output\", \"text\": ...}}, got {str(part)[:80]}", f"{where}.content")
        if kind == "text" and parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + part["text"]}
        else:
            parts.append({"type": kind, "text": part["text"]})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages has {len(messages)} entries; the limit is {MAX_MESSAGES}", "messages")
    out, total, turns = [], 0, 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role == "assistant":
            content = parse_assistant_content(message.get("content"), where)
            text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        else:
            content = text = _content_text(message.get("content"), where)
        if not text.strip():
            raise InvalidRequest(f"{where} is empty; every message needs some text", f"{where}.content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise InvalidRequest(f"{where} has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,} "
                                 f"per message", f"{where}.content")
        total += len(text)
        if role == "system" and i == 0:
            out.append({"role": "system", "content": text})
            continue
        expected = "user" if turns % 2 == 0 else "assistant"
        turns += 1
        if role != expected:
            allowed = "user or assistant (system only as the first message)"
            got = f"role {role!r}" if role in ("user", "assistant", "system") else f"unknown role {role!r}"
            raise InvalidRequest(f"{where} has {got} where {expected!r} was expected: roles are {allowed}, "
                                 f"alternating, starting with user", f"{where}.role")
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise InvalidRequest(f"the messages have {total:,} characters in all; the limit is {MAX_TOTAL_CHARS:,}",
                             "messages")
    if out[-1]["role"] != "user":
        raise InvalidRequest(f"the last message must be from the user (it is {out[-1]['role']!r}): "
                             f"the reply continues the conversation from there", "messages")
    return out


def parse_top_k(body: dict, default: int) -> int:
    """top_k in [1, 200], or 0 for no top-k (picochat's extension)."""
    if type(body.get("top_k")) is int and body["top_k"] == 0:
        return 0
    try:
        return _number(body, "top_k", default, 1, MAX_TOP_K, integer=True)
    except InvalidRequest as e:
        raise InvalidRequest(e.message + " (or 0 for no top-k)", "top_k")


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest(f"stop must be a non-empty string or a list of them, got {shown(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
    longest = max(len(s) for s in stops)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequest(f"a stop string has {longest} characters; the limit is {MAX_STOP_CHARS}", "stop")
    return stops


def parse_chat_request(body, defaults: Defaults) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or InvalidRequest naming the first rule it breaks."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {shown(stream)}", "stream")
    options = body.get("stream_options") or {}
    show_marker = body.get("show_answer_marker", False)
    if not isinstance(show_marker, bool):
        raise InvalidRequest(f"show_answer_marker must be true or false, got {shown(show_marker)}",
                             "show_answer_marker")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest(f"seed must be an integer, got {shown(seed)}", "seed")
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        stream=stream,
        n=_number(body, "n", 1, 1, MAX_N, integer=True),
        temperature=_number(body, "temperature", defaults.temperature, 0.0, MAX_TEMPERATURE, integer=False),
        top_k=parse_top_k(body, defaults.top_k),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, integer=False, low_open=True),
        frequency_penalty=_number(body, "frequency_penalty", defaults.frequency_penalty, -MAX_PENALTY, MAX_PENALTY,
                                  integer=False),
        presence_penalty=_number(body, "presence_penalty", defaults.presence_penalty, -MAX_PENALTY, MAX_PENALTY,
                                 integer=False),
        max_tokens=_number(body, "max_tokens", None, 1, MAX_TOKENS, integer=True),
        seed=None if seed is None else seed % 2**63,
        stop=parse_stop(body.get("stop")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        show_answer_marker=show_marker,
    )


def fit_max_tokens(request: ChatRequest, prompt_len: int, context: int, default: int) -> int:
    """How many tokens the reply may have: the request's max_tokens if prompt + max_tokens fits
    the model's context (else a 400 saying what fits), or the server's default cut to fit."""
    room = context - prompt_len
    if room < 1:
        raise InvalidRequest(f"the conversation is {prompt_len} tokens; the model's context is {context} "
                             f"tokens, with room for the reply: shorten the conversation", "messages",
                             code="context_length_exceeded")
    if request.max_tokens is None:
        return min(default, room)
    if request.max_tokens > room:
        raise InvalidRequest(f"the conversation ({prompt_len} tokens) plus max_tokens ({request.max_tokens}) "
                             f"exceeds the model's context of {context} tokens: ask for at most {room}",
                             "max_tokens", code="context_length_exceeded")
    return request.max_tokens


# -----------------------------------------------------------------------------
# Reply shapes


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_response(cid: str, model: str, replies: list["ReplyParts"], reasons: list[str],
                        prompt_tokens: int, completion_tokens: int) -> dict:
    """A plain reply: each choice's message has `content`, its text, and `parts`, the whole reply
    (text and tool parts in order: send it back as the content of this assistant message)."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": reply.content, "parts": reply.parts},
                     "finish_reason": reason} for i, (reply, reason) in enumerate(zip(replies, reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


# -----------------------------------------------------------------------------
# A reply's parts: text, and tool blocks that only the model's special tokens open and close


class ReplyParts:
    """One choice's reply, built from what the scheduler sends (text, and each special token as a
    marker, never as text) into the API's shapes. Text outside a tool block is the reply's
    `content`; a tool block is a part of type "python" or "python_output", streamed as `tool`
    deltas: {"index": n, "type", "text"}, the first with text "" (the block opened), the last with
    "done": true (its end token came). n counts the reply's tool parts from 0. Other special tokens
    (a stray end, <|user_start|>) are dropped. `parts` is the reply so far, in order.

    The text is displayed text (picochat/display.py): the answer marker is cut, and text that may
    still be one is held back until the next text or marker decides it, or `flush()` at the end.
    `show_answer_marker`: the text as the model wrote it."""

    def __init__(self, show_answer_marker: bool = False):
        self.parts: list[dict] = []
        self.open: dict | None = None  # the tool part being written
        self.tools = 0  # tool parts opened so far
        self.display = None if show_answer_marker else DisplayStream()

    @property
    def content(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    def feed(self, text: str = "", marker: str | None = None) -> list[dict]:
        """New text or one marker -> the stream deltas for it (a chunk's `delta` each)."""
        if marker is not None:
            return self.flush() + self._marker(marker)  # text on either side of a marker is not contiguous
        if self.open is not None:
            if not text:
                return []
            self.open["text"] += text
            return [self._tool_delta(text)]
        return self._text(self.display.feed(text) if self.display else text)

    def flush(self) -> list[dict]:
        """The deltas of the text held back: call it when the reply has ended."""
        return self._text(self.display.finish()) if self.display else []

    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": "text", "text": text})
        return [{"content": text}]

    def _marker(self, name: str) -> list[dict]:
        if name in OPENS:  # a new block ends one left open (the engine starts over at a second call)
            deltas = self._close()
            self.open = {"type": OPENS[name], "text": ""}
            self.parts.append(self.open)
            self.tools += 1
            return deltas + [self._tool_delta("")]
        if self.open is not None and CLOSES.get(name) == self.open["type"]:
            return self._close()
        return []

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        delta = self._tool_delta("", done=True)
        self.open = None
        return [delta]

    def _tool_delta(self, text: str, done: bool = False) -> dict:
        tool = {"index": self.tools - 1, "type": self.open["type"], "text": text}
        return {"tool": tool | {"done": True}} if done else {"tool": tool}
