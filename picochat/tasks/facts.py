"""
Facts: "What is X?" answered by looking X up with the search tool (docs/TOOLS.md) and saying what the
top page says, in one short sentence; the `chat_eval -a Facts` evaluation of it (docs/EVALS.md).

A training conversation, from a train title's Wikipedia summary (held_out(title) is False):

    user:      What is a volcano?
    assistant: <|python_start|>search("volcano")<|python_end|>
               <|output_start|>Volcano: A volcano is a rupture in the crust of ...<|output_end|>
               According to the encyclopedia, a volcano is a rupture in the crust of a planetary-mass object.

- The question is EncyclopediaQA's (the same "What is" / "Who was" / "Tell me about" phrasings, the
  subject as the summary names it); the query is the subject without its article.
- The tool's output is what the search tool answers for that query on the real index, so training
  matches inference: the index must be built (`picochat index build --dataset demo`).
- The answer is the first sentence of the first page whose title names X ("Mercury (element)" for
  "What is Mercury?"), as far as the output shows it (the tool cuts each of its 3 lines to ~166
  characters), ended at the first clause end after the verb where it holds the page's key fact
  (below; else before a preposition or 'and'), without parentheses (dates, pronunciations). A page
  whose line is cut before that gives no conversation (5% of them), and so does a title whose own
  page is not in the top 3 (2%: "China" finds History of China, Economy of China, ...), since
  "I couldn't find anything about China" would teach a falsehood.
- One question in ten is about something the encyclopedia does not have: a made-up word ("What is
  a zorvane?", usually "No results."), or a made-up person with a real first name ("Who was Maria
  Velkon?", whose results are about other people). Both are answered "I couldn't find anything
  about X.", as is any question whose results name no page X.
- No held-out page reaches training: a question whose results include a held-out page is left out
  (8% of them), so the test titles are in the index but in no training conversation.

The test split is the frozen file picochat/tasks/data/facts_keys.json: the held-out titles whose
first sentence yields a key (below) and whose name no other page shares, each with its question and
its key words. It was written once by `python -m picochat.tasks.facts` and is never rewritten; the
evaluation reads only the file, so a later change to the rule or the phrasings cannot move it.

The key of a title (derive_keys): the summary's first sentence without parentheses; its predicate,
the words after the first is/are/was/were; of those, the first KEY_WORDS content words: letters only,
3+ letters, not a stopword, not a participle (5+ letters ending in -ed/-ing: 'consisting', 'based'),
not a form of the subject's own words. "A volcano is a rupture in the crust of a planetary-mass
object" -> rupture, crust, planetary. A title has a key when this gives at least 2 words.

The checker (has_key_fact): a reply passes when its own words (outside the tool call and the tool's
output) contain at least PASS_KEYS of the keys (both when there are 2), case-insensitive, as whole
words, a plural or -ed/-ing form counting ('ruptures'). Found-nothing questions pass a reply that
says it found nothing. RL rewards train titles with keys derived by the same rule at run time.

    Facts(split="train", first=0, count=5000)   # conversations (~13% of the 5,000 left out, above)
    Facts(split="train", questions_only=True)   # RL: the questions alone, no index needed
    Facts(split="test")                         # the frozen questions, asked without an answer
    python -m picochat.tasks.facts --out /tmp/keys.json   # the rule, run again (the file stays)
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from picochat.common import PicochatError
from picochat.data.sources import WIKI, held_out, wiki_summaries
from picochat.search import Hit, build_command, default_index, format_hits, index_path, search
from picochat.tasks.base import Task
from picochat.tasks.encyclopedia import SENTENCE_BREAK, TELL, WHAT, WHO, subject_of, topic_name
from picochat.toolbox import SEARCH_RESULTS, named_call
from picochat.tools import TOOL_OUTPUT_CHARS

KEYS_FILE = Path(__file__).parent / "data" / "facts_keys.json"
KEY_WORDS, PASS_KEYS = 3, 2
STOPWORDS = frozenset("""
    a an the of and or nor but in on at to for by with from as into onto upon its it itself their them
    they his her hers him he she this that these those which who whom whose what where when while is are
    was were be been being has have had do does did also known one two three first second many most more
    much other others such some any all each both either neither usually often commonly generally
    typically mainly mostly largely primarily widely very well use used using refers refer term terms name
    names named word words kind kinds type types form forms sort sorts part parts group groups set number
    series than then there here not only can may might could would should will about between within
    during after before over under through among against without like including include includes
    especially particularly various several different same own new way ways called so
    de la le del der von van du des di da el""".split())
VERB = re.compile(r"\b(?:is|are|was|were)\b")
WORD = re.compile(r"[A-Za-z]+")
PARENTHESES = re.compile(r"\s*\([^()]*\)")
TOOL_BLOCK = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>|$)", re.S)
OUTPUT_BLOCK = re.compile(r"<\|output_start\|>.*?(?:<\|output_end\|>|$)", re.S)
SPECIAL = re.compile(r"<\|[a-z_]+\|>")
PHRASE_END = re.compile(r"\s(?=(?:and|or|in|of|to|from|on|for|with|by|between|near|at|as)\s)")
CLAUSE_END = re.compile(r",\s|;\s|\s[-–—]\s|—|\s(?=(?:that|which|who|whose|where|such as)\s)")
NOT_FOUND = re.compile(r"\b(?:couldn't|could not|can't|cannot|didn't|did not) find\b|\bfound nothing\b|"
                       r"\bno results\b|\bnothing (?:about|on)\b", re.I)

ABSENT_EVERY = 10  # every 10th training question is about something the encyclopedia lacks
LOOKUPS = ["", "", "Let me look that up.\n\n", "I'll search for it.\n\n"]  # text before the call
FOUND = ["According to the encyclopedia, ", "I looked it up: ", "From what I found, ", "The encyclopedia says "]
FOUND_OTHER = ["Here's what I found: ", "The encyclopedia says: "]  # before a sentence that starts otherwise
NOTHING = ["I couldn't find anything about {x}.", "I searched, but I couldn't find anything about {x}.",
           "I couldn't find anything about {x} in the encyclopedia.", "The search found nothing about {x}."]
SYLLABLES = ("zor vel mar qui tash bren olo dax fen rim ul ka thi vor nesk pol ari sen gol mib tu ve "
             "lor dri ost kem ya pra").split()


# -----------------------------------------------------------------------------
# Keys and the checker

def _forms(word: str) -> set[str]:
    """'ruptures' -> {'ruptures', 'rupture'}: the word and what it is with a plural or -ed/-ing
    ending taken off (never shorter than 4 letters); two words match when their forms meet."""
    word = word.lower()
    out = {word}
    for ending, stem_end in (("ies", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("d", ""),
                             ("ing", ""), ("ing", "e")):
        if word.endswith(ending) and len(word) - len(ending) + len(stem_end) >= 4:
            out.add(word[:len(word) - len(ending)] + stem_end)
    return out


def first_sentence(summary: str) -> str:
    return SENTENCE_BREAK.split(summary.split("\n\n")[0])[0]


def derive_keys(title: str, summary: str) -> list[str]:
    """The title's key words by the rule in the module docstring ([] or one word: no usable key)."""
    sentence = PARENTHESES.sub("", first_sentence(summary))
    verb = VERB.search(sentence)
    if verb is None:
        return []
    own = set().union(*(_forms(w) for w in WORD.findall(topic_name(title))))
    keys, seen = [], set()
    for word in WORD.findall(sentence[verb.end():]):
        word = word.lower()
        forms = _forms(word)
        if (len(word) < 3 or word in STOPWORDS or forms & own or forms & seen
                or (len(word) >= 5 and word.endswith(("ed", "ing")))):
            continue
        keys.append(word)
        seen |= forms
        if len(keys) == KEY_WORDS:
            break
    return keys


def reply_text(completion: str) -> str:
    """What the assistant said itself: the completion without its tool calls, the tools' outputs
    and special tokens (the output of a search holds the answer; copying it is not answering)."""
    return SPECIAL.sub("", OUTPUT_BLOCK.sub(" ", TOOL_BLOCK.sub(" ", completion)))


def has_key_fact(reply: str, keys: list[str]) -> bool:
    """The reply contains at least PASS_KEYS of the keys (all of them when there are fewer)."""
    said = set().union(*(_forms(w) for w in WORD.findall(reply))) if reply else set()
    found = sum(bool(_forms(key) & said) for key in keys)
    return bool(keys) and found >= min(PASS_KEYS, len(keys))


def called_search(completion: str) -> bool:
    """The completion called the search tool (a python block that is a search(...) call)."""
    for code in TOOL_BLOCK.findall(completion):
        named = named_call(code)
        if named is not None and named[0].name == "search":
            return True
    return False


# -----------------------------------------------------------------------------
# The frozen test file

def load_keys(path: Path = KEYS_FILE) -> list[dict]:
    """The frozen test questions: [{"title", "question", "keys"}, ...] in the file's order."""
    try:
        return json.loads(Path(path).read_text())["questions"]
    except (OSError, ValueError, KeyError) as e:
        raise PicochatError(f"cannot read the Facts key file {path} ({e}); it is part of picochat: "
                            f"restore it from git (`git checkout -- {path}`)") from None


def question_for(title: str, topic: str, summary: str, rng: random.Random) -> tuple[str, str]:
    """(question, subject as asked) in one of EncyclopediaQA's everyday phrasings."""
    subject, verb = subject_of(title, summary)
    forms = (WHO if topic == "People" else WHAT) if rng.random() < 0.5 else TELL
    question = rng.choice(forms).format(subject=subject, verb=verb)
    return (question[0].upper() + question[1:] if rng.random() < 0.8 else question), subject


def checkable(rows) -> dict[str, list[str]]:
    """{title: keys} of the titles a checker can grade: a key (2+ words) and a name no other page
    has ('Mercury' names a planet and an element: either answer to "What is Mercury?" is right)."""
    names: dict[str, int] = {}
    for title, _, _ in rows:
        names[topic_name(title).lower()] = names.get(topic_name(title).lower(), 0) + 1
    keyed = {title: derive_keys(title, summary) for title, _, summary in rows}
    return {t: keys for t, keys in keyed.items() if len(keys) >= 2 and names[topic_name(t).lower()] == 1}


def held_out_questions(rows) -> list[dict]:
    """The test questions: every checkable held-out title in a fixed shuffled order (the first 256
    spread over every topic area), each asked in a phrasing drawn from a fixed seed."""
    keyed = checkable(rows)
    out = [{"title": title, "question": question_for(title, topic, summary, random.Random(f"Facts/test/{title}"))[0],
            "keys": keyed[title]} for title, topic, summary in rows if held_out(title) and title in keyed]
    return sorted(out, key=lambda q: random.Random(q["title"]).random())


def write_key_file(path: Path) -> int:
    questions = held_out_questions(wiki_summaries())
    about = (f"Frozen: the Facts evaluation's questions and key words, written once from {WIKI.filename} by "
             f"the rule in picochat/tasks/facts.py (derive_keys). Never rewritten; a changed rule goes to a "
             f"new file and a new evaluation name. A reply passes with at least {PASS_KEYS} of a title's keys.")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(" " + json.dumps(q, ensure_ascii=False) for q in questions)  # one question a line
    path.write_text(f'{{"about": {json.dumps(about)},\n"questions": [\n{lines}\n]}}\n')
    return len(questions)


# -----------------------------------------------------------------------------
# Conversations

def query_of(subject: str) -> str:
    """'a volcano' -> 'volcano': what the model types into the search."""
    return re.sub(r"^(?:a|an|the) ", "", subject, flags=re.I)


def search_call(query: str) -> str:
    return 'search("' + query.replace("\\", "\\\\").replace('"', '\\"') + '")'


def same_name(a: str, b: str) -> bool:
    """'accordions' names 'Accordion', 'Doll's House' names 'A Doll's House': the same words, articles
    and plural endings aside."""
    a_words, b_words = WORD.findall(query_of(a)), WORD.findall(query_of(b))
    return len(a_words) == len(b_words) > 0 and all(_forms(x) & _forms(y) for x, y in zip(a_words, b_words))


def answer_from(hit: Hit, line: str) -> str:
    """The hit's first sentence as far as its output line shows it, ended at the first clause end
    after the verb where what comes before holds the page's key fact ('A volcano is a rupture in the
    crust of a planetary-mass object, such as...' -> '... object.'), without parentheses; "" when the
    line ends before that."""
    sentence = " ".join(first_sentence(hit.text).split())
    shown = line[:-3] if line.endswith("...") else line
    start = shown.find(sentence[:20])
    if start < 0:
        return ""
    whole = shown[start:start + len(sentence)] == sentence
    shown = PARENTHESES.sub("", shown[start:start + len(sentence)])
    verb, keys = VERB.search(shown), derive_keys(hit.title, hit.text)
    if verb is None:
        return ""
    # Where it may end: a clause's end, else (a line cut mid-clause) before a preposition or 'and'.
    # Nothing within 8 characters of the verb: "X is a" is no answer.
    ends = [m.start() for m in CLAUSE_END.finditer(shown, verb.end() + 8)] + ([len(shown)] if whole else [])
    ends += [m.start() for m in PHRASE_END.finditer(shown, verb.end() + 8)]
    for end in ends:
        if len(keys) < 2 or has_key_fact(shown[:end], keys):
            return " ".join(shown[:end].split()).rstrip(" ,;:.!?") + "."
    return ""


def restated(answer: str, subject: str, rng: random.Random) -> str:
    """'A volcano is ...' -> 'According to the encyclopedia, a volcano is ...' with the subject as
    the question spelled it; another start gets an opener that can stand before a capital."""
    if re.match(re.escape(subject) + r"[ ,]", answer, re.IGNORECASE):
        return rng.choice(FOUND) + subject + answer[len(subject):]
    return rng.choice(FOUND_OTHER) + answer


def made_up(rng: random.Random, first_names: list[str]) -> tuple[str, str]:
    """(question, subject) about something no page has: a made-up word or a made-up person."""
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    kind = rng.random()
    if kind < 0.4:
        subject = ("an " if word[0] in "aeiou" else "a ") + word
        question = rng.choice(WHAT).format(subject=subject, verb="is")
    elif kind < 0.7:
        subject = word.capitalize()
        question = rng.choice(TELL).format(subject=subject)
    else:
        subject = f"{rng.choice(first_names)} {word.capitalize()}"
        question = rng.choice(WHO + TELL).format(subject=subject, verb="was")
    return question[0].upper() + question[1:], subject


class Facts(Task):
    """split="train": conversations with a search call, from `count` candidate questions from the
    `first` on (those whose results show a held-out page are left out); with questions_only, their
    questions alone, about checkable titles, for RL (no index needed). split="test": the frozen
    questions of KEYS_FILE."""

    def __init__(self, split: str = "train", first: int = 0, count: int | None = None,
                 questions_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise PicochatError(f"Facts has splits train and test, got {split!r}")
        self.split, self.source, self.skipped = split, "offline", 0
        if split == "test":
            self.examples = [{"messages": [{"role": "user", "content": q["question"]}], "kind": "title",
                              "title": q["title"], "keys": q["keys"]} for q in load_keys()]
            return
        path = index_path(default_index())
        if not questions_only and not path.is_file():
            raise PicochatError(f"Facts needs the search index at {path}; build it with `{build_command(path)}`")
        summaries = wiki_summaries()
        # In an order of their own, so Facts and EncyclopediaQA slices cover different titles.
        rows = sorted(((t, topic, s) for t, topic, s in summaries if not held_out(t)),
                      key=lambda row: random.Random(f"Facts/{row[0]}").random())
        self.held_out_titles = {t for t, _, _ in summaries if held_out(t)}
        self.names = {query_of(topic_name(t)).lower() for t, _, _ in summaries}
        self.first_names = sorted({t.split()[0] for t, topic, _ in rows if topic == "People" and len(t.split()) == 2})
        self.keyed = checkable(summaries) if questions_only else None
        total = len(rows) * ABSENT_EVERY // (ABSENT_EVERY - 1)
        self.examples = []
        for i in range(first, total if count is None else min(total, first + count)):
            if i % ABSENT_EVERY == ABSENT_EVERY - 1:
                example = self.absent_example(i)
            else:
                example = self.title_example(i, rows[i - i // ABSENT_EVERY])
            if example is None:
                self.skipped += 1
            else:
                self.examples.append(example)

    def conversation(self, question: str, subject: str, rng: random.Random) -> tuple[dict, Hit | None] | None:
        """The conversation for a question, with the real search's output, and the page it answers
        from (None: it found nothing about the subject); None when a held-out page shows, or the
        output cuts the page's first sentence before one of its clauses ends."""
        query = query_of(subject)
        hits = search(index_path(default_index()), query, k=SEARCH_RESULTS)
        if any(hit.title in self.held_out_titles for hit in hits):
            return None
        output = format_hits(hits, TOOL_OUTPUT_CHARS)
        about = next((i for i, hit in enumerate(hits) if same_name(topic_name(hit.title), query)), None)
        if about is None:
            answer = rng.choice(NOTHING).format(x=subject)
        else:
            answer = answer_from(hits[about], output.split("\n")[about])
            if not answer:
                return None
            answer = restated(answer, subject, rng)
        lookup = rng.choice(LOOKUPS)
        parts = [{"type": "text", "text": lookup}] if lookup else []
        parts += [{"type": "python", "text": search_call(query)}, {"type": "python_output", "text": output},
                  {"type": "text", "text": answer}]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return {"messages": messages}, None if about is None else hits[about]

    def title_example(self, index: int, row: tuple[str, str, str]) -> dict | None:
        title, topic, summary = row
        rng = random.Random(f"Facts/train/{index}")
        question, subject = question_for(title, topic, summary, rng)
        if self.keyed is not None:  # questions only: graded as the test questions are
            return None if title not in self.keyed else \
                {"messages": [{"role": "user", "content": question}], "kind": "title", "title": title,
                 "keys": self.keyed[title]}
        made = self.conversation(question, subject, rng)
        if made is None or made[1] is None:  # its page ranks below 3 others ('China': History of China...):
            return None                      # "I couldn't find anything about China" would teach a falsehood
        conversation, page = made
        return {**conversation, "kind": "title", "title": title, "keys": derive_keys(page.title, page.text)}

    def absent_example(self, index: int) -> dict | None:
        rng = random.Random(f"Facts/absent/{index}")
        question, subject = made_up(rng, self.first_names or ["Maria"])
        while query_of(subject).lower() in self.names:  # a made-up name that is a page after all
            question, subject = made_up(rng, self.first_names or ["Maria"])
        if self.keyed is not None:
            return {"messages": [{"role": "user", "content": question}], "kind": "absent", "title": None, "keys": []}
        made = self.conversation(question, subject, rng)
        return None if made is None else {**made[0], "kind": "absent", "title": None, "keys": []}

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.examples)

    def get_example(self, index: int) -> dict:
        return self.examples[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """A title question passes with its key fact in the reply's own words; a question about
        something absent passes a reply that says it found nothing."""
        reply = reply_text(completion)
        if conversation["kind"] == "absent":
            return bool(NOT_FOUND.search(reply))
        return has_key_fact(reply, conversation["keys"])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Derive the Facts test keys from the Wikipedia summaries. "
                                            "The committed file is frozen: this writes it only where it is missing.")
    p.add_argument("--out", type=Path, default=KEYS_FILE, help="where to write (default: the frozen file)")
    out = p.parse_args().out
    if out.resolve() == KEYS_FILE.resolve() and KEYS_FILE.exists():
        raise SystemExit(f"{KEYS_FILE} is frozen and exists; write a copy with --out to compare")
    print(f"wrote {write_key_file(out)} questions to {out}")
