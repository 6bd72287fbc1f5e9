"""
Continuous batching: one background thread per engine (model replica) that serves every active
request in each decode step.

This is picochat's only decode loop: the server runs it in a thread, and chat, the evals, RL
rollouts and the base model's samples turn it on their own thread (`generate`, `generate_batch`,
`run_to_completion`). A `Job` is one request: a prompt and `n` choices, each choice a row of the
decode cache (picochat.decode.Cache, rows at their own positions). Between two steps the scheduler
  1. drops the rows whose client went away or whose time ran out (so a slot frees within one step),
  2. admits queued jobs while slots are free: the prompt is prefilled alone (batch 1), copied into
     one row per choice, and each choice's first token is sampled from the prefill's logits;
then it runs one forward over all active rows (one token each), samples every row with its own
settings and random generator (engine.sample_rows), and streams the text of each row to its job.
Finished rows leave; the last row moves into the hole, so the active rows are always the first
`cache.rows`.

A special token (a tool call's <|python_start|>, the tool's <|output_start|> ...) never becomes
text: it reaches the job as a Delta of its own (`marker`), in order with the text around it. So a
tool output or a reply that spells "<|output_end|>" stays text, and whoever shows the reply (the
server, the web page) can tell a real tool block from a forged one.

Greedy rows give the same tokens whatever else is in the batch (up to float rounding in batched
matmuls; equal in fp32 on CPU in tests/test_serve.py), and a seeded row draws the same samples.
Tool calls use the Engine's state machine (engine.advance / force_output); the tool itself runs in a
worker thread so the other rows keep decoding, and the calling row sits out the steps until the
result is forced in. `EnginePool` sends each job to the least loaded of several schedulers (one per
GPU).

    scheduler = Scheduler(Engine(model, tokenizer), max_rows=8, max_queue=64)
    scheduler.start()
    scheduler.submit(Job(prompt, emit=print, max_tokens=32, temperature=0.0))

    for tokens, masks in generate(engine, prompt, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                   # tokens[i] is row i's next token (mask 0: forced)
"""
from __future__ import annotations

import random
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from picochat.decode import bucket
from picochat.engine import Engine, RowState, StreamDecoder, sample_rows


class QueueFull(Exception):
    """Every engine's queue is full: the caller should answer 429 and ask the client to retry."""


@dataclass
class Delta:
    """What a job's consumer receives: new text of choice `index`, or a special token the choice
    emitted or was forced to emit (`marker`, its name: "<|python_start|>" ...; never in `text`), and
    once, its finish_reason ("stop", "length" or "error") with the number of tokens generated."""
    index: int
    text: str = ""
    marker: str | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    tokens: list[int] | None = None   # with the finish_reason, for a job with keep_tokens: every token
    sampled: list[bool] | None = None  # generated (the end token included), and which were sampled
                                       # (False: forced in, the tool's output)


@dataclass
class Job:
    """One request: a prompt, its sampling settings and `n` choices (one cache row each). `emit`
    receives every Delta of every choice; `cancel()` (the client went away) frees its rows at the
    start of the next step."""
    prompt: list[int]
    emit: Callable[[Delta], None]  # called from the scheduler thread: must be thread-safe
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: logit -= count · frequency + (count > 0) · presence,
    presence_penalty: float = 0.0   # counted over the tokens this choice has sampled (not tool output)
    seed: int | None = None  # None: a random seed; choice i uses seed + i
    shared_generator: bool = False  # True: one generator (seed) for all n choices, drawing n numbers
                                    # per step, ended choices' too (generate's draws since the seed)
    stop: list[str] = field(default_factory=list)
    timeout: float | None = None  # seconds from submission, then finish_reason "length"
    cancelled: bool = False  # set by the consumer when its client went away
    keep_tokens: bool = False  # report each choice's tokens when it finishes (RL trains on them)
    on_token: Callable[[int, int, bool], None] | None = None  # (choice, token, sampled) for every
                                                              # token, the end token included
    stream_text: bool = True  # False: no text Deltas (and no stop strings), for on_token's readers

    def __post_init__(self):
        self.submitted = time.monotonic()
        self.deadline = None if self.timeout is None else self.submitted + self.timeout
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(2**31)

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass
class Row:
    """One choice of one job, in one row of the decode cache."""
    job: Job
    index: int
    generator: torch.Generator
    stream: StreamDecoder
    state: RowState = field(default_factory=RowState)
    last: int = 0  # the token emitted last, fed to the model in the next step
    tokens: int = 0  # tokens generated so far
    text: str = ""  # text decoded so far (special tokens are not text: see marks)
    sent: int = 0  # how much of text has been emitted
    marks: list[tuple[int, str]] = field(default_factory=list)  # (offset in text, special token name)
    marks_sent: int = 0  # how many of marks have been emitted
    tool: Future | None = None  # a tool call in flight: the row waits for it
    finished: bool = False
    ids: list[int] = field(default_factory=list)  # with job.keep_tokens: every token generated
    sampled: list[bool] = field(default_factory=list)  # and whether it was sampled (not forced)
    counts: torch.Tensor | None = None  # with a penalty: how often each token was sampled (V,)


class Scheduler:
    """The decode loop of one engine (one model replica, one device): a bounded queue of jobs and
    up to `max_rows` active rows. `start()` runs it in a thread (the server); `run_once()` turns it
    once, for callers that drive it themselves (chat_eval).

    `max_len`: positions per row (default: the model's context). `tool_workers` 0 runs a tool call
    in line, so every row gets a token in every step (generate). `masked` False when the caller
    knows its rows stay at one length (generate: one prompt, in line tools): no attention mask then,
    as a row decoded alone has none."""
    def __init__(self, engine: Engine, max_rows: int = 8, max_queue: int = 64, tool_workers: int = 2,
                 max_len: int | None = None, masked: bool = True, raise_errors: bool = False):
        self.engine = engine
        model = engine.model
        self.device = next(model.parameters()).device
        self.max_rows, self.max_queue = max_rows, max_queue
        self.max_len = max_len or model.config.sequence_len
        self.masked = masked
        self.raise_errors = raise_errors  # generate: a failed step is the caller's error, not a finish_reason
        self.special_names = {i: name for name, i in engine.tokenizer.special_ids.items()}
        self.cache = engine.new_cache(max_rows, self.max_len)
        self.rows: list[Row] = []  # rows[i] lives in cache row i
        self.queue: deque[Job] = deque()
        self.lock = threading.Lock()  # guards queue (submit runs on the HTTP thread)
        self.wakeup = threading.Event()
        self.tools = ThreadPoolExecutor(tool_workers, thread_name_prefix="picochat-tool") if tool_workers else None
        self.tokens_generated = 0  # counters read by /metrics
        self.steps = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the HTTP side ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job (thread-safe); QueueFull when `max_queue` jobs are already waiting."""
        if job.n > self.max_rows:
            raise ValueError(f"n={job.n} is more than this server's {self.max_rows} slots")
        with self.lock:
            self._drop_cancelled()
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting")
            self.queue.append(job)
        self.wakeup.set()

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return len(self.rows)

    def load(self) -> int:
        """Rows busy or asked for: what the pool balances."""
        return len(self.rows) + sum(job.n for job in list(self.queue) if not job.cancelled)

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self.run, name="picochat-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.tools is not None:
            self.tools.shutdown(wait=False, cancel_futures=True)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping:
            if not self.run_once():
                self.wakeup.wait(timeout=0.05)  # idle, or every row waits for a tool
                self.wakeup.clear()

    def run_once(self) -> bool:
        """One turn of the loop: free the rows of gone clients, admit queued jobs, decode one
        step. Returns False when there was nothing to decode."""
        try:
            self.drop_gone_rows()
            self.admit()
            if not self.rows or all(self.waiting(row) for row in self.rows):
                return False
            self.step()
        except Exception:  # a failed step (out of memory, a bug) must not kill the server
            if self.raise_errors:
                raise
            traceback.print_exc()
            for row in self.rows:
                self.finish(row, "error")
            self.remove_finished()
        return True

    def waiting(self, row: Row) -> bool:
        if row.tool is not None and row.tool.done():
            self.engine.force_output(row.state, row.tool.result())
            row.tool = None
        return row.tool is not None

    def drop_gone_rows(self) -> None:
        """Rows of cancelled jobs leave silently; rows out of time finish with "length"."""
        now = time.monotonic()
        for row in self.rows:
            if row.job.cancelled:
                row.finished = True
            elif row.job.expired(now):
                self.finish(row, "length")
        self.remove_finished()

    def _drop_cancelled(self) -> None:
        """Forget queued jobs whose clients went away: they hold no slot and count for no 429."""
        if any(job.cancelled for job in self.queue):
            self.queue = deque(job for job in self.queue if not job.cancelled)

    def admit(self) -> None:
        while True:
            with self.lock:
                self._drop_cancelled()
                if not self.queue or self.queue[0].n > self.max_rows - len(self.rows):
                    return
                job = self.queue.popleft()
            if job.expired(time.monotonic()):  # timed out while queued
                for i in range(job.n):
                    job.emit(Delta(i, finish_reason="length"))
                continue
            try:
                self.prefill(job)
            except Exception:  # this prompt failed (out of memory?): say so, keep serving the rest
                if self.raise_errors:
                    raise
                traceback.print_exc()
                started = {row.index for row in self.rows if row.job is job}
                for row in self.rows:
                    if row.job is job:  # no orphan rows decoding for a job that has ended
                        self.finish(row, "error", flush=False)
                self.remove_finished()
                for i in range(job.n):
                    if i not in started:
                        job.emit(Delta(i, finish_reason="error"))

    @torch.no_grad()
    def prefill(self, job: Job) -> None:
        """Run the prompt alone, copy it into one free row per choice, sample the first tokens."""
        logits, prefill = self.engine.prefill(job.prompt)
        new = []
        shared = torch.Generator(device=self.device).manual_seed(job.seed) if job.shared_generator else None
        for i in range(job.n):
            self.cache.load_row(len(self.rows), prefill)
            generator = shared if shared is not None else torch.Generator(device=self.device).manual_seed(job.seed + i)
            row = Row(job, i, generator, StreamDecoder(self.engine.tokenizer))
            self.rows.append(row)
            new.append(row)
        self.cache.rows = len(self.rows)
        self.sample_and_emit(new, logits.expand(job.n, -1))
        self.remove_finished()

    @torch.no_grad()
    def step(self) -> None:
        """One token for every active row. A row waiting for a tool is fed its last token again and
        its cache length is stepped back afterwards, so that write is simply redone later."""
        waiting = [self.waiting(row) for row in self.rows]
        ids = torch.tensor([row.last for row in self.rows], dtype=torch.long, device=self.device)
        logits = self.engine.forward(ids.unsqueeze(1), self.cache, masked=self.masked)
        if any(waiting):
            for i, wait in enumerate(waiting):
                if wait:
                    self.cache.lengths[i] -= 1
            ready = [i for i, wait in enumerate(waiting) if not wait]
            self.sample_and_emit([self.rows[i] for i in ready], logits[ready])
        else:
            self.sample_and_emit(self.rows, logits)
        self.steps += 1
        self.remove_finished()

    def sample_and_emit(self, rows: list[Row], logits: torch.Tensor) -> None:
        jobs = [row.job for row in rows]
        penalized = [i for i, job in enumerate(jobs) if job.frequency_penalty or job.presence_penalty]
        if penalized:
            logits = logits.clone()  # (the model's own logits may be an inference-mode tensor)
            for i in penalized:
                row = rows[i]
                if row.counts is None:
                    row.counts = torch.zeros(logits.size(-1), device=logits.device)
                logits[i] -= row.counts * row.job.frequency_penalty + (row.counts > 0) * row.job.presence_penalty
        if all(job.temperature == 0 for job in jobs):  # greedy rows draw nothing
            sampled = logits.argmax(dim=-1).tolist()
        else:
            sampled = sample_rows(logits, torch.tensor([j.temperature for j in jobs]),
                                  torch.tensor([j.top_k for j in jobs]), torch.tensor([j.top_p for j in jobs]),
                                  self.draws(rows)).tolist()
        for row, token in zip(rows, sampled):
            forced = bool(row.state.forced)
            if forced:  # the tool's output overrides what was sampled
                token = row.state.forced.popleft()
            if row.job.keep_tokens:
                row.ids.append(token)
                row.sampled.append(not forced)
            if row.job.on_token is not None:
                row.job.on_token(row.index, token, not forced)
            if row.counts is not None and not forced:
                row.counts[token] += 1
            self.advance(row, token)

    @staticmethod
    def draws(rows: list[Row]) -> torch.Tensor:
        """One uniform number per row: from the row's own generator, or, for a job with a shared
        generator, the row's place among the job's n numbers drawn once for this step."""
        shared: dict[int, torch.Tensor] = {}
        out = []
        for row in rows:
            g = row.generator
            if row.job.shared_generator:
                if id(g) not in shared:
                    shared[id(g)] = torch.rand(row.job.n, generator=g, device=g.device)
                out.append(shared[id(g)][row.index:row.index + 1])
            else:
                out.append(torch.rand(1, generator=g, device=g.device))
        return torch.cat(out)

    def advance(self, row: Row, token: int) -> None:
        """Record one new token of a row: tool state, text, and whether the row is done."""
        engine, job = self.engine, row.job
        row.last = token
        self.tokens_generated += 1
        code = None
        if row.state.in_python or token in engine.watch_tokens:  # the state machine only where it can move
            code = engine.advance(row.state, token)
        if row.state.done:  # <|assistant_end|> or <|bos|>: not part of the text
            return self.finish(row, "stop")
        row.tokens += 1
        if code is not None and self.tools is None:
            engine.force_output(row.state, engine.run_tool(code))
        elif code is not None:
            row.tool = self.tools.submit(engine.run_tool, code)
            row.tool.add_done_callback(lambda _: self.wakeup.set())
        if job.stream_text:
            if token in self.special_names:  # structure, not text
                row.text += row.stream.flush()  # a character cut short by the special token ends here
                row.marks.append((len(row.text), self.special_names[token]))
            else:
                row.text += row.stream.feed(token)
            if self.emit_text(row):
                return self.finish(row, "stop", flush=False)
        # The last token sampled is never fed back: the cache needs prompt + max_tokens - 1 rows.
        if row.tokens >= job.max_tokens or len(job.prompt) + row.tokens >= self.max_len + 1:
            self.finish(row, "length")

    def emit_text(self, row: Row) -> bool:
        """Send the row's new text and markers, holding back what could be the start of a stop
        string. Returns True when a stop string appeared (the text before it is sent, not the
        string). A stop string never spans a marker: the text on either side is not contiguous."""
        stops = row.job.stop
        floor = row.marks[-1][0] if row.marks else 0
        end = len(row.text)
        for stop in stops:
            at = row.text.find(stop, max(floor, row.sent - len(stop) + 1))
            if at != -1:
                end = min(end, at)
        if end < len(row.text):
            self.send(row, end)
            return True
        hold = max((n for stop in stops for n in range(1, min(len(stop), len(row.text) - floor + 1))
                    if row.text.endswith(stop[:n])), default=0)
        self.send(row, len(row.text) - hold)
        return False

    def send(self, row: Row, end: int) -> None:
        """Emit the row's text up to offset `end`, with the markers that fall within it, in order."""
        while row.marks_sent < len(row.marks) and row.marks[row.marks_sent][0] <= end:
            at, name = row.marks[row.marks_sent]
            self._send_text(row, at)
            row.job.emit(Delta(row.index, marker=name))
            row.marks_sent += 1
        self._send_text(row, end)

    def _send_text(self, row: Row, end: int) -> None:
        if end > row.sent:
            row.job.emit(Delta(row.index, row.text[row.sent:end]))
            row.sent = end

    def finish(self, row: Row, reason: str, flush: bool = True) -> None:
        if row.finished:
            return
        row.finished = True
        if flush and row.job.stream_text:  # the rest of the text, held-back stop-string prefixes and partial characters
            row.text += row.stream.flush()
            self.send(row, len(row.text))
        keep = row.job.keep_tokens
        row.job.emit(Delta(row.index, finish_reason=reason, completion_tokens=row.tokens,
                           tokens=row.ids if keep else None, sampled=row.sampled if keep else None))

    def remove_finished(self) -> None:
        """Free the rows that are done: the last active row moves into each hole."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].finished:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.move_row(last, i)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1
        self.cache.rows = len(self.rows)


class EnginePool:
    """Several schedulers (one per GPU): each job goes to the least loaded one with queue room."""

    def __init__(self, schedulers: list[Scheduler]):
        if not schedulers:
            raise ValueError("an engine pool needs at least one scheduler")
        self.schedulers = schedulers

    def submit(self, job: Job) -> Scheduler:
        """Give the job to the least loaded engine that has queue room; QueueFull if none has."""
        for scheduler in sorted(self.schedulers, key=Scheduler.load):
            try:
                scheduler.submit(job)
                return scheduler
            except QueueFull:
                continue
        raise QueueFull("every engine's queue is full")

    @property
    def max_rows(self) -> int:
        return self.schedulers[0].max_rows

    @property
    def active(self) -> int:
        return sum(s.active for s in self.schedulers)

    @property
    def queued(self) -> int:
        return sum(s.queued for s in self.schedulers)

    @property
    def slots(self) -> int:
        return sum(s.max_rows for s in self.schedulers)

    @property
    def tokens_generated(self) -> int:
        return sum(s.tokens_generated for s in self.schedulers)

    def start(self) -> "EnginePool":
        for s in self.schedulers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.schedulers:
            s.stop()


# -----------------------------------------------------------------------------
# Batch generation on the caller's thread (chat_eval, RL rollouts)

@dataclass
class Completion:
    """One finished choice of a job run by run_to_completion. `text` is the reply as
    Tokenizer.decode spells it, special tokens by name (what the tasks' graders read)."""
    text: str = ""
    finish_reason: str | None = None
    tokens: list[int] | None = None   # with Job.keep_tokens
    sampled: list[bool] | None = None


def run_to_completion(scheduler: Scheduler, jobs: list[Job],
                      on_job_done: Callable[[int], None] | None = None) -> list[list[Completion]]:
    """Run `jobs` on `scheduler`, turned on this thread, until every choice has finished; returns
    each job's choices in order. Jobs are queued as the scheduler's queue has room, so any number
    can be given; `on_job_done(i)` is called when all of job i's choices are done (progress)."""
    results = [[Completion() for _ in range(job.n)] for job in jobs]
    left = [job.n for job in jobs]
    unfinished = sum(left)

    def emitter(i: int):
        def emit(delta: Delta) -> None:
            nonlocal unfinished
            choice = results[i][delta.index]
            choice.text += delta.text if delta.marker is None else delta.marker
            if delta.finish_reason is not None and choice.finish_reason is None:
                choice.finish_reason, choice.tokens, choice.sampled = delta.finish_reason, delta.tokens, delta.sampled
                left[i] -= 1
                unfinished -= 1
                if left[i] == 0 and on_job_done is not None:
                    on_job_done(i)
        return emit

    pending = deque(jobs)
    for i, job in enumerate(jobs):
        job.emit = emitter(i)
    while unfinished:
        while pending and scheduler.queued < scheduler.max_queue:
            scheduler.submit(pending.popleft())
        if not scheduler.run_once():
            time.sleep(0.005)  # every active row is waiting for its tool
    return results


def generate(engine: Engine, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 42, frequency_penalty: float = 0.0, presence_penalty: float = 0.0
             ) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (token_column, mask_column) per step for `num_samples` continuations of `tokens`: the
    prompt is prefilled once and shared by every row; the rows sample with one generator seeded
    `seed`, n numbers per step, as picochat's engine always has (one generator for the batch, as in
    nanochat's; a server request's choices have a generator each); mask 0 marks a forced token (a
    tool's output).

    Stops after max_tokens steps (default: until prompt + reply fill the model's sequence_len), or
    once every row has ended; a row that ended repeats its end token (mask 0) in later columns.
    It is the Scheduler turned on this thread, with the tools run in line, so every row that has
    not ended gets one token per step."""
    model = engine.model
    if not tokens:
        raise ValueError("the prompt is empty; start it with <|bos|>")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_len, limit = len(tokens), model.rotary_len
    if prompt_len > limit:
        raise ValueError(f"the prompt has {prompt_len} tokens; the model's limit is {limit}")
    if max_tokens is None:  # fill the context the model was trained on (nanochat HEAD)
        max_tokens = model.config.sequence_len - prompt_len
    # The last sampled token is never fed back, so the cache needs prompt + max_tokens - 1
    # positions; the rotary table bounds how far the model can go at all.
    steps = min(max_tokens, limit - prompt_len + 1)
    if steps <= 0:
        return
    rows, length = num_samples, prompt_len + steps - 1
    if engine.compiled is not None:  # static shapes: a few cache sizes, not one per prompt length
        rows, length = bucket(rows, 1 << 20), bucket(length, limit, 64)
    scheduler = Scheduler(engine, max_rows=rows, max_queue=1, tool_workers=0, max_len=length, masked=False,
                          raise_errors=True)
    queued: list[deque] = [deque() for _ in range(num_samples)]
    ended = [False] * num_samples

    def emit(delta: Delta) -> None:
        if delta.finish_reason is not None:
            ended[delta.index] = True

    scheduler.submit(Job(list(tokens), emit, n=num_samples, max_tokens=steps, temperature=temperature,
                         top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed, shared_generator=True,
                         frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, stream_text=False,
                         on_token=lambda i, token, sampled: queued[i].append((token, int(sampled)))))
    scheduler.admit()  # the prefill and every row's first token, yielded before the first decode step
    last = [0] * num_samples
    while True:
        while any(not q and not done for q, done in zip(queued, ended)):
            scheduler.run_once()
        if not any(queued):
            return
        column, mask = [], []
        for i, q in enumerate(queued):
            token, sampled = q.popleft() if q else (last[i], 0)
            last[i] = token
            column.append(token)
            mask.append(sampled)
        yield column, mask


def generate_batch(engine: Engine, tokens: list[int], num_samples: int = 1, **kwargs
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """All samples of `generate` at once: (results, masks), each row the prompt plus its generated
    tokens (without the token that ended it); masks are 0 over the prompt and forced tokens."""
    results = [list(tokens) for _ in range(num_samples)]
    masks = [[0] * len(tokens) for _ in range(num_samples)]
    done = [False] * num_samples
    for token_column, mask_column in generate(engine, tokens, num_samples, **kwargs):
        for i, (token, mask) in enumerate(zip(token_column, mask_column)):
            if done[i]:
                continue
            if token in engine.stop_tokens:
                done[i] = True
            else:
                results[i].append(token)
                masks[i].append(mask)
    return results, masks
