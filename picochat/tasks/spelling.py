"""
Two synthetic spelling tasks that teach a model to see the letters inside its tokens (docs/DESIGN.md#tasks,
seed era):

- SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".
- SpellingBee: how many times does a letter occur in a word, asked through many user phrasings
  (some in Spanish, French, German, Chinese, Japanese and Korean, with random quoting, casing and
  question marks). The assistant spells the word as `w:o,r,d`, walks through it counting hits,
  then double-checks with a python tool call `'word'.count('l')` and its output, and ends with
  '#### n'. In 9 of 10 examples the letter occurs in the word.

Words: 234,450 lowercase English words from the english-words wheel on PyPI (tasks/offline.py).
source='hub' reads nanochat's list instead (dwyl/english-words words_alpha.txt, 370K words, from
GitHub); 'auto' uses the wheel, so the same words are used on every machine. Train and test words
are disjoint: a word's split is fixed by a hash of the word itself (10% test), so no test word is
ever seen in training, whichever list or size is used. Example i is drawn from an RNG seeded with
(task, split, i), so a task is the same on every run.

    SpellingBee(size=80_000, split="train"); SpellingBee(size=256, split="test")
    SimpleSpelling(size=200_000)
"""
from __future__ import annotations

import hashlib
import random
import string
from functools import lru_cache

from picochat.common import PicochatError, picochat_home
from picochat.data.download import download_file
from picochat.tasks import offline
from picochat.tasks.base import Task
from picochat.tasks.gsm8k import answers_match, extract_answer, reference_answer

TEST_PERCENT = 10
DWYL_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
SPLITS = ("train", "test")


def word_split(word: str) -> str:
    """'test' for a fixed 10% of words (by a hash of the word, the same everywhere), else 'train'."""
    bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


@lru_cache(maxsize=4)
def split_words(split: str, source: str = "auto") -> tuple[str, ...]:
    """The words of one split, sorted."""
    if split not in SPLITS:
        raise PicochatError(f"spelling tasks have splits train and test, got {split!r}")
    if source in ("auto", "offline"):
        words = offline.english_words()
    elif source == "hub":
        path = download_file(DWYL_URL, picochat_home() / "task_data" / "dwyl" / "words_alpha.txt")
        words = sorted({w.strip().lower() for w in path.read_text().split()
                        if w.strip().isascii() and w.strip().isalpha()})
    else:
        raise PicochatError(f"source must be auto, hub or offline, got {source!r}")
    return tuple(w for w in words if word_split(w) == split)


class _WordTask(Task):
    def __init__(self, size: int, split: str, source: str, **kwargs):
        super().__init__(**kwargs)
        if size < 1:
            raise PicochatError(f"{type(self).__name__} size must be at least 1, got {size}")
        self.size, self.split, self.source = size, split, source
        self.words = split_words(split, source)
        self.skipped = 0

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        # a str seed is hashed with SHA-512 by random.seed: the same stream on every run and
        # machine, and train/test streams never coincide (unlike small int seeds such as 1 and -1)
        return random.Random(f"{type(self).__name__}/{self.split}/{index}")

    @property
    def eval_type(self) -> str:
        return "generative"


# -----------------------------------------------------------------------------
# SimpleSpelling

class SimpleSpelling(_WordTask):

    def __init__(self, size: int = 1000, split: str = "train", source: str = "auto", **kwargs):
        super().__init__(size, split, source, **kwargs)

    def get_example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------
# SpellingBee

# {word} and {letter} arrive already quoted (or not) by the example's RNG.
QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many {letter}s are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "How many times does {letter} occur in the word {word}?",
    "Count the number of {letter} in {word}.",
    "Count how many times {letter} shows up in {word}.",
    "In the word {word}, how many {letter} are there?",
    "In {word}, how often does the letter {letter} appear?",
    "What is the number of {letter} in {word}?",
    "Can you count the {letter} in {word}?",
    "Please tell me how many {letter} the word {word} contains.",
    "How many occurrences of {letter} are in {word}?",
    "Tell me the count of the letter {letter} in {word}.",
    "Does {word} contain the letter {letter}? How many times?",
    "I need to know how many {letter} there are in {word}.",
    "Quick question: how many {letter} in {word}?",
    "how many {letter} does {word} have",
    "Number of {letter}'s in {word}?",
    "Find how many times {letter} appears in the word {word}.",
    "If you spell {word}, how many {letter} do you write?",
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}?",
    "¿Cuántas {letter} hay en {word}?",
    "Combien de fois la lettre {letter} apparaît-elle dans le mot {word} ?",
    "Combien de {letter} y a-t-il dans {word} ?",
    "Wie oft kommt der Buchstabe {letter} im Wort {word} vor?",
    "Wie viele {letter} sind in {word}?",
    "单词 {word} 中有几个字母 {letter}？",
    "{word} 这个词里有多少个 {letter}？",
    "{word} という単語に {letter} はいくつありますか？",
    "{word}에 {letter}가 몇 개 있나요?",
]
QUOTES = ["", "'", '"']


class SpellingBee(_WordTask):

    def __init__(self, size: int = 1000, split: str = "train", source: str = "auto", **kwargs):
        super().__init__(size, split, source, **kwargs)

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        quote_word, quote_letter = rng.choice(QUOTES), rng.choice(QUOTES)
        question = rng.choice(QUESTIONS).format(word=f"{quote_word}{word}{quote_word}",
                                                letter=f"{quote_letter}{letter}{quote_letter}")
        if rng.random() < 0.3:
            question = question[0].lower() + question[1:]
        if rng.random() < 0.2 and question.endswith("?"):
            question = question[:-1]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": self.answer(word, letter)}]}

    @staticmethod
    def answer(word: str, letter: str) -> list[dict]:
        lines, count = [], 0
        for i, char in enumerate(word, start=1):
            if char == letter:
                count += 1
                lines.append(f"{i}:{char} hit! count={count}")
            else:
                lines.append(f"{i}:{char}")
        walk = (f"We need to count the letter '{letter}' in the word '{word}'. First, spell it out:\n\n"
                f"{word}:{','.join(word)}\n\nNow go through it letter by letter:\n"
                + "\n".join(lines) + f"\n\nThat makes {count}.\n\nLet me double check with Python:\n\n")
        return [{"type": "text", "text": walk},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(word.count(letter))},
                {"type": "text", "text": f"\n\nPython also gives {count}.\n\n#### {count}"}]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(completion), reference_answer(conversation))
