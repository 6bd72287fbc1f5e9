"""
Facts (picochat/tasks/facts.py): training conversations that search the real index and answer from
its output, questions about what the index lacks, no held-out page in training, the frozen key file,
the checker on hand-written replies, the RL reward, and `chat_eval -a Facts` with and without search
(decoding faked at run_to_completion: the replies are written here, the tool is the engine's).

    pytest -q tests/test_facts.py
"""
from __future__ import annotations

import json
import random
import re

import pytest

import picochat.tasks.facts as facts
from picochat.common import PicochatError
from picochat.data.sources import held_out
from picochat.search import INDEX_ENV, NO_RESULTS, build_index, index_path
from picochat.tasks.facts import (FOUND, NOT_FOUND, Facts, called_search, derive_keys, has_key_fact, held_out_questions,
                                  load_keys, reply_text)
from picochat.toolbox import named_call, run_tool

# (title, topic, summary). Lisbon, Cello and Whaling are held out (by the hash of the title, checked
# below); Portugal's search shows Lisbon, so Portugal is never a training conversation.
ROWS = [
    ("Volcano", "Physical sciences", "A volcano is a rupture in the crust of a planet, through which hot lava, "
                                     "ash and gases escape from below the surface. Volcanoes are common."),
    ("Mauna Loa", "Geography", "Mauna Loa is one of five volcanoes that form the island of Hawaii."),
    ("Thomas Edison", "People", "Thomas Edison was an American inventor and businessman. He made many devices."),
    ("Potato", "Biology and health sciences", "The potato is a starchy tuber of the plant Solanum tuberosum."),
    ("Hat", "Everyday life", "A hat is a head covering which is worn for various reasons."),
    ("Glacier", "Physical sciences", "A glacier is a persistent body of dense ice that is always moving."),
    ("Portugal", "Geography", "Portugal is a country on the Iberian Peninsula in southwestern Europe."),
    ("Tiger", "Biology and health sciences", "The tiger is the largest living cat species, with orange fur."),
    ("Bread", "Everyday life", "Bread is a staple food prepared from a dough of flour and water."),
    ("Piano", "Arts", "The piano is a keyboard instrument that makes sound when its keys are pressed."),
    ("Moon", "Physical sciences", "The Moon is the only natural satellite of Earth."),
    ("Desert", "Physical sciences", "A desert is a landscape where little precipitation occurs."),
    ("Lisbon", "Geography", "Lisbon is the capital and largest city of Portugal."),
    ("Cello", "Arts", "The cello is a bowed string instrument of the violin family."),
    ("Whaling", "Everyday life", "Whaling is the hunting of whales for their products such as meat and blubber."),
]
HELD_OUT = {"Lisbon", "Cello", "Whaling"}
TEXT = ("What is a volcano? Tell me about the cello. Who was Thomas Edison? Lisbon is the capital of "
        "Portugal. Whaling is a sport. I couldn't find anything. search(\"x\") ") * 30


@pytest.fixture
def index(home, monkeypatch):
    """ROWS as the demo's summaries and its search index, in a temporary home."""
    monkeypatch.setattr(facts, "wiki_summaries", lambda: ROWS)
    monkeypatch.delenv(INDEX_ENV, raising=False)
    build_index(index_path("demo"), [(t, s) for t, _, s in ROWS], source="the test's pages")


@pytest.fixture(scope="module")
def tok():
    from picochat.tokenizer import train_tokenizer
    return train_tokenizer([TEXT], 300)


def parts_of(example: dict) -> dict:
    return {p["type"]: p["text"] for p in example["messages"][1]["content"]}


def test_the_rows_split_as_the_tests_assume():
    assert {t for t, _, _ in ROWS if held_out(t)} == HELD_OUT


# -----------------------------------------------------------------------------
# Keys and the checker

@pytest.mark.parametrize("title, summary, keys", [
    ("Volcano", "A volcano is a rupture in the crust of a planetary-mass object, such as Earth.",
     ["rupture", "crust", "planetary"]),
    ("Thomas Edison", "Thomas Edison (1847–1931) was an American inventor and businessman.",
     ["american", "inventor", "businessman"]),
    ("Cubit", "The cubit is an ancient unit of length based on the forearm.", ["ancient", "unit", "length"]),
    # the subject's own words and participles are left out
    ("Golden Gate Bridge", "The Golden Gate Bridge is a suspension bridge spanning the strait connecting the bay.",
     ["suspension", "strait", "bay"]),
    ("Earwig", "Earwigs make up the insect order Dermaptera.", []),  # no is/are/was/were: no key
])
def test_keys_are_the_first_content_words_after_the_verb(title, summary, keys):
    assert derive_keys(title, summary) == keys


VOLCANO_KEYS = ["rupture", "crust", "planetary"]


@pytest.mark.parametrize("reply", [
    "A volcano is a rupture in the crust.", "Volcanoes are RUPTURES of the crust!",
    "It is where the crust has a rupture.", "A rupture on a planetary body."])
def test_a_reply_with_two_of_the_keys_passes(reply):
    assert has_key_fact(reply, VOLCANO_KEYS)


@pytest.mark.parametrize("reply", [
    "A volcano is a mountain.", "A volcano is a rupture.", "corruptured and crusty", ""])
def test_a_reply_with_fewer_than_two_of_the_keys_fails(reply):
    assert not has_key_fact(reply, VOLCANO_KEYS)


def test_with_two_keys_both_are_needed_and_the_tool_output_is_not_the_reply():
    assert has_key_fact("An American poet.", ["american", "poet"])
    assert not has_key_fact("An American.", ["american", "poet"])
    task = Facts(split="test")
    conv = {"messages": [], "kind": "title", "keys": ["rupture", "crust", "planetary"]}
    looked_up = ('<|python_start|>search("volcano")<|python_end|><|output_start|>Volcano: A volcano is a rupture '
                 'in the crust of a planetary-mass object...<|output_end|>')
    assert not task.evaluate(conv, looked_up + "I don't know.<|assistant_end|>")  # copying is not answering
    assert task.evaluate(conv, looked_up + "A volcano is a rupture in the crust.<|assistant_end|>")
    assert reply_text(looked_up + "Hi") == "  Hi"
    assert called_search(looked_up) and not called_search("12 * 7") and not called_search(
        "<|python_start|>12 * 7<|python_end|><|output_start|>84<|output_end|>")
    absent = {"messages": [], "kind": "absent", "keys": []}
    assert task.evaluate(absent, "I couldn't find anything about a zorvel.")
    assert not task.evaluate(absent, "A zorvel is a kind of bird.")


# -----------------------------------------------------------------------------
# Training conversations

def test_a_conversation_searches_and_answers_from_exactly_what_the_tool_returns(index, tok):
    task = Facts(split="train")
    titles = {ex["title"] for ex in task if ex["kind"] == "title"}
    assert titles == {t for t, _, _ in ROWS} - HELD_OUT - {"Portugal"}
    sp = tok.encode_special
    for ex in task:
        parts = parts_of(ex)
        tool, query = named_call(parts["python"])
        assert tool.name == "search" and parts["python_output"] == run_tool(parts["python"])  # what inference gets
        ids, mask = tok.render_conversation(ex)
        start, end = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
        assert tok.decode(ids[start + 1:end]) == parts["python_output"] and not any(mask[start:end + 1])
        call = ids.index(sp("<|python_start|>"))
        assert tok.decode(ids[call + 1:ids.index(sp("<|python_end|>"))]) == parts["python"] and mask[call] == 1
        if ex["kind"] == "title":
            assert has_key_fact(parts["text"], ex["keys"]) and parts["text"].startswith(tuple(FOUND) + ("Here's",
                                                                                                         "The enc"))
    volcano = next(ex for ex in task if ex["title"] == "Volcano")
    assert "Mauna Loa" in parts_of(volcano)["python_output"]  # 'volcanoes' there: the real output has both pages
    assert parts_of(volcano)["text"].endswith("volcano is a rupture in the crust of a planet.")  # its first clause


def test_questions_about_what_the_index_lacks_say_nothing_was_found(index, monkeypatch):
    monkeypatch.setattr(facts, "ABSENT_EVERY", 3)
    task = Facts(split="train")
    absent = [ex for ex in task if ex["kind"] == "absent"]
    assert len(absent) >= 4
    for ex in absent:
        assert NOT_FOUND.search(parts_of(ex)["text"]) and task.evaluate(ex, parts_of(ex)["text"])
    assert any(parts_of(ex)["python_output"] == NO_RESULTS for ex in absent)
    # a made-up person with a real first name: results about someone else, still nothing about them
    made, page = task.conversation("Who was Thomas Zorvel?", "Thomas Zorvel", random.Random(0))
    assert page is None and "Thomas Edison" in parts_of(made)["python_output"]
    assert re.search(r"(nothing|anything) about Thomas Zorvel", parts_of(made)["text"])


def test_no_held_out_page_is_in_any_training_conversation(index, monkeypatch):
    monkeypatch.setattr(facts, "ABSENT_EVERY", 3)
    task = Facts(split="train")
    assert task.skipped >= 1  # Portugal: its results show Lisbon
    held_out_text = [s[:30] for t, _, s in ROWS if t in HELD_OUT]
    for ex in task:
        assert ex["title"] not in HELD_OUT
        text = json.dumps(ex["messages"], ensure_ascii=False)
        assert not any(title + ":" in text or start in text for title, start in zip(sorted(HELD_OUT), held_out_text))
    assert len(Facts(split="train", first=3, count=5)) <= 5  # a slice searches only its own candidates


def test_a_title_whose_own_page_the_search_misses_is_left_out_not_answered_nothing_found(index, monkeypatch):
    search = facts.search
    monkeypatch.setattr(facts, "search", lambda path, query, k: [h for h in search(path, query, k)
                                                                 if h.title != "Hat"])
    task = Facts(split="train")
    assert "Hat" not in {ex["title"] for ex in task} and all(ex["title"] is None for ex in task if ex["kind"] == "absent")


def test_without_an_index_the_task_says_how_to_build_it(home, monkeypatch):
    monkeypatch.setattr(facts, "wiki_summaries", lambda: ROWS)
    monkeypatch.delenv(INDEX_ENV, raising=False)
    with pytest.raises(PicochatError, match="picochat index build --dataset demo"):
        Facts(split="train")


# -----------------------------------------------------------------------------
# The frozen test file and RL

def test_the_frozen_key_file_holds_256_or_more_held_out_titles_each_with_a_key(monkeypatch):
    monkeypatch.setattr(facts, "wiki_summaries", lambda: pytest.fail("the test split reads only the file"))
    questions = load_keys()
    assert len(questions) >= 256 and len({q["title"] for q in questions}) == len(questions)
    for q in questions:
        assert held_out(q["title"]) and q["question"].strip()
        assert 2 <= len(q["keys"]) <= facts.KEY_WORDS and all(k.isalpha() and k.islower() for k in q["keys"])
    task = Facts(split="test")
    assert len(task) == len(questions)
    assert task[0]["messages"] == [{"role": "user", "content": questions[0]["question"]}]
    assert "Frozen" in json.loads(facts.KEYS_FILE.read_text())["about"]


def test_held_out_questions_are_the_checkable_held_out_titles():
    questions = held_out_questions(ROWS)
    assert {q["title"] for q in questions} == HELD_OUT
    lisbon = next(q for q in questions if q["title"] == "Lisbon")
    assert lisbon["keys"] == ["capital", "largest", "city"] and "Lisbon" in lisbon["question"]


def test_rl_questions_need_no_index_and_the_reward_is_the_checker(home, monkeypatch):
    from picochat.rl import Rollout, score
    monkeypatch.setattr(facts, "wiki_summaries", lambda: ROWS)
    task = Facts(split="train", questions_only=True)  # no index in this home
    volcano = next(ex for ex in task if ex["title"] == "Volcano")
    assert [m["role"] for m in volcano["messages"]] == ["user"] and volcano["keys"] == ["rupture", "crust", "planet"]
    call = ('<|python_start|>search("volcano")<|python_end|><|output_start|>Volcano: A volcano is a rupture in '
            'the crust of a planet<|output_end|>')
    group = [Rollout([1], [2], [True], call + "A volcano is a rupture in the crust."),
             Rollout([1], [2], [True], call + "It is a mountain."),
             Rollout([1], [2], [True], "A volcano is a mountain that is hot."),
             Rollout([1], [2], [True], "", failed=True)]
    score(task, volcano, group)
    assert [r.reward for r in group[:3]] == [1.0, 0.0, 0.0] and group[3].reward == 0.0
    assert [r.advantage for r in group[:3]] == pytest.approx([2 / 3, -1 / 3, -1 / 3])


# -----------------------------------------------------------------------------
# chat_eval -a Facts

def test_chat_eval_facts_scores_the_replies_and_counts_search_calls_with_and_without_search(
        index, tok, monkeypatch, tmp_path, capsys):
    """Lisbon and Cello are looked up and answered from the output; Whaling is answered without a
    search, wrongly. --no-search: the same calls are refused, so nothing is answered."""
    import picochat.scheduler
    import picochat.stages.chat_eval as stage
    import picochat.tokenizer
    from picochat.model import GPT, GPTConfig
    from picochat.scheduler import Completion
    monkeypatch.setattr(facts, "load_keys", lambda: held_out_questions(ROWS))
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    model.init_weights(seed=0)
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: (model, {"model_tag": "t", "step": 3}))
    monkeypatch.setattr(picochat.tokenizer, "get_tokenizer", lambda: tok)

    def replies(scheduler, jobs, on_job_done=None):
        out = []
        for job in jobs:
            prompt = tok.decode(job.prompt)
            if "haling" in prompt:
                out.append([Completion("Whaling is a sport.<|assistant_end|>", "stop")])
                continue
            code = 'search("lisbon")' if "Lisbon" in prompt else 'search("cello")'
            output = scheduler.engine.run_tool(code)
            answer = "I am not sure." if output.startswith("Error") else output.split("\n")[0].split(": ")[-1]
            out.append([Completion(f"<|python_start|>{code}<|python_end|><|output_start|>{output}<|output_end|>"
                                   f"{answer}<|assistant_end|>", "stop")])
        return out
    monkeypatch.setattr(picochat.scheduler, "run_to_completion", replies)

    assert stage.main(["-a", "Facts", "--device", "cpu", "--dtype", "float32"]) == 0
    assert stage.main(["-a", "Facts", "--device", "cpu", "--dtype", "float32", "--no-search"]) == 0
    out = capsys.readouterr().out
    assert "Facts          accuracy 0.6667 (95% CI" in out and "search called in 0.6667 of replies" in out
    saved = json.loads((index_path("demo").parent.parent / "evals" / "chat_sft_t_step000003.json").read_text())
    assert saved["results"] == pytest.approx({"Facts": 2 / 3, "Facts_search_calls": 2 / 3, "Facts-no-search": 0.0,
                                              "Facts-no-search_search_calls": 2 / 3})
    assert saved["problems"] == {"Facts": 3, "Facts-no-search": 3}


def test_chat_eval_facts_without_an_index_is_one_line(home, monkeypatch):
    import picochat.stages.chat_eval as stage
    monkeypatch.delenv(INDEX_ENV, raising=False)
    with pytest.raises(PicochatError, match="--no-search"):
        stage.need_index()


def test_the_report_card_has_a_facts_row():
    from picochat.report import CHAT_ROWS, summary_rows
    assert "Facts" in [name for name, _, _ in CHAT_ROWS]
    rows = summary_rows(None, {"sft": {"results": {"Facts": 0.25}, "problems": {"Facts": 256}}})
    facts_row = next(r for r in rows if r[0] == "Facts")
    assert float(facts_row[3]) == 0.25 and facts_row[3].n == 256 and facts_row[1] is None

