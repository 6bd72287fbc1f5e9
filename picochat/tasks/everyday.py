"""
Everyday: ~50 prompts a new user types into the demo chat, scored automatically by
picochat/evals/everyday.py. Nothing here is in a training mixture: no greeting, identity question
or follow-up is word for word one of the identity task's or the chatterbot corpus's (similar small
talk is trained on, as it should be: "How are you doing?" is, "Hi there, how are you?" is not), and the topic
questions ask about Wikipedia titles the demo holds out (`held_out(title)`: they are neither in the
pretraining corpus's train split nor in EncyclopediaQA's).

    kind       n   example                                   a pass needs
    greeting   6   "Hi there, how are you?"                  not canned, modern English
    identity   4   "Could you tell me who you are?"          names picochat
    general    6   "Why do people like music?"               names music, not canned, modern English
    topic     30   "What is a hat?" / "Tell me about hats."  names the topic, not canned, modern English
    follow-up  4   a topic question, its answer, then "Tell me more about it."   as topic

Each conversation carries its "kind" and "topic" (None where no topic applies).

    Everyday(); Everyday().evaluate(conversation, "Hats are head coverings...")
"""
from __future__ import annotations

import random
import re

from picochat.data.sources import held_out, wiki_summaries
from picochat.tasks.base import Task
from picochat.tasks.encyclopedia import TELL, WHAT, WHO, first_sentences, subject_of, topic_name

GREETINGS = ["Hi there, how are you?", "Good evening!", "Hey, what have you been up to today?", "Good afternoon.",
             "Good morning, how are you feeling?", "Hello, how is your day going?"]
IDENTITY = ["Could you tell me who you are?", "What are you called?", "Who built you?",
            "What sort of things can you help me with?"]
GENERAL = [("Why do people like music?", "music"), ("What should I eat for breakfast?", "breakfast"),
           ("How do I make a cup of tea?", "tea"), ("Can you recommend a good book?", "book"),
           ("Do you like dogs?", "dog"), ("What is the weather like in summer?", "summer")]
FOLLOW_UPS = ["Tell me more about it.", "Why is that important?", "Can you say more?",
              "What else should I know about it?"]
NUM_TOPIC, NUM_FOLLOW_UP = 30, 4


def everyday_titles(count: int) -> list[tuple[str, str, str]]:
    """`count` held-out (title, topic, summary) rows with plain names (letters and spaces, at most
    two words), in a fixed order by a hash of the title."""
    rows = [row for row in wiki_summaries()
            if held_out(row[0]) and re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)?", topic_name(row[0]))]
    rows.sort(key=lambda row: random.Random(row[0]).random())
    return rows[:count]


def build_conversations() -> list[dict]:
    convs = []

    def add(kind, messages, topic=None):
        convs.append({"messages": messages, "kind": kind, "topic": topic})

    for text in GREETINGS:
        add("greeting", [{"role": "user", "content": text}])
    for text in IDENTITY:
        add("identity", [{"role": "user", "content": text}], "picochat")
    for text, topic in GENERAL:
        add("general", [{"role": "user", "content": text}], topic)
    titles = everyday_titles(NUM_TOPIC + NUM_FOLLOW_UP)
    for i, (title, topic, summary) in enumerate(titles[:NUM_TOPIC]):
        subject, verb = subject_of(title, summary)
        phrasings = (WHO if topic == "People" else WHAT) if i % 2 == 0 else TELL
        question = phrasings[i // 2 % len(phrasings)].format(subject=subject, verb=verb)
        add("topic", [{"role": "user", "content": question[0].upper() + question[1:]}], topic_name(title))
    for (title, topic, summary), follow in zip(titles[NUM_TOPIC:], FOLLOW_UPS):
        subject, verb = subject_of(title, summary)
        question = (WHO if topic == "People" else WHAT)[0].format(subject=subject, verb=verb)
        add("follow-up", [{"role": "user", "content": question[0].upper() + question[1:]},
                          {"role": "assistant", "content": first_sentences(summary, 400, 1)},
                          {"role": "user", "content": follow}], topic_name(title))
    return convs


class Everyday(Task):

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.split, self.source, self.skipped = "test", "offline", 0
        self.convs = build_conversations()

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> dict:
        return self.convs[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from picochat.evals.everyday import passes
        return passes(conversation, completion)
