"""
The everyday scorers (picochat/evals/everyday.py) on hand-written good and bad replies, and the
Everyday task's prompts (picochat/tasks/everyday.py) from the fixture wheels.

    pytest -q tests/test_everyday.py
"""
from __future__ import annotations

import pytest

from fixtures import modern_wheels as fx
from picochat.common import PicochatError
from picochat.evals.everyday import (ends_turn, is_canned, is_english, modern_english_share, on_topic,
                                     score_replies, uses_early_modern)
from picochat.tasks.identity import TOPICS
from picochat.tasks.spelling import SpellingBee

pytestmark = pytest.mark.usefixtures("one_thread")

# A small word list standing in for Webster's (the english-words wheel), enough for the replies below.
WORDS = frozenset("""a an the is are was be to of and in it that for with on as at by this from or
have has do does help you your me my we our they people how can what who tell about plant fruit red
eat cook edible vegetable hat head cover worn weather music like listen feel good day today fine
thank thanks hello hi great question city capital large portugal villain word speak good sir
young star form cloud gas dust many reason them no hear""".split())


# --- on topic -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, topic", [
    ("The tomato is a red fruit that people eat.", "Tomato"),
    ("Tomatoes are eaten as a vegetable.", "Tomato"),
    ("Taxonomy is the science of naming and classifying organisms.", "Taxonomy (biology)"),
    ("The Roman Empire was the state ruled by the emperors of Rome.", "Roman Empire"),
    ("hats are worn on the head", "Hat"),
])
def test_a_reply_that_names_the_topic_is_on_topic(reply, topic):
    assert on_topic(reply, topic)


@pytest.mark.parametrize("reply, topic", [
    ("I can hold a conversation, answer general questions, spell words, and work out arithmetic.", "Volcano"),
    ("The empire lasted for centuries.", "Roman Empire"),  # one of two words
    ("", "Moon"),
    ("That is a good question!", "Tomato"),
])
def test_a_reply_that_does_not_name_the_topic_is_off_topic(reply, topic):
    assert not on_topic(reply, topic)


# --- canned lines -------------------------------------------------------------------------------

def test_identity_answers_and_spelling_walkthroughs_are_canned():
    abilities = TOPICS["abilities"][1][1]  # "I can hold a conversation, answer general questions, ..."
    assert is_canned(abilities)
    assert is_canned("I try, but I'm often wrong, especially about facts, long texts and hard reasoning.")
    assert is_canned(abilities.replace("conversation", "chat"))  # a small edit is still the same line
    walk = SpellingBee.answer("volcano", "o")
    assert is_canned("".join(part["text"] for part in walk))
    assert is_canned("volcano:v,o,l,c,a,n,o")


def test_real_answers_and_greetings_are_not_canned():
    assert not is_canned("A volcano is a rupture in the crust of a planet through which lava escapes.")
    assert not is_canned("Hello! How can I help today?")  # a greeting answers a greeting
    assert not is_canned("People like music because it makes them feel good.")
    assert not is_canned("")


# --- modern English -----------------------------------------------------------------------------

def test_modern_english_scores_modern_prose_high_and_early_modern_low():
    good = "The hat is a head cover that people have worn for many reasons."
    bad = "Thou art a villain, sir, and thy words hath no good in them, doth thee hear?"
    assert modern_english_share(good, WORDS) >= 0.9
    assert modern_english_share(bad, WORDS) < 0.7  # below the 0.8 a pass needs
    assert uses_early_modern(bad) and not uses_early_modern(good)
    assert modern_english_share("", WORDS) == 0.0


def test_names_are_left_out_and_inflections_resolve_to_their_stems():
    # 'Lisbon' and 'Portugal' mid-sentence are names: they neither help nor hurt
    assert modern_english_share("The capital of Portugal is Lisbon, a large city.", WORDS) == 1.0
    assert is_english("helped", WORDS) and is_english("cities", WORDS) and is_english("don't", WORDS)
    assert is_english("listening", WORDS) and not is_english("hath", WORDS | {"hath"})
    assert modern_english_share("Zxqv blorp fnord.", WORDS) == 0.0


def test_the_word_list_from_the_english_words_wheel(home, monkeypatch):
    """The real list (Webster's 2nd from PyPI); skipped where PyPI is out of reach."""
    from picochat.evals import everyday
    from picochat.tasks import offline
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "15")
    offline.english_words.cache_clear()
    everyday.english_word_list.cache_clear()
    try:
        words = everyday.english_word_list()
    except PicochatError as e:
        pytest.skip(f"english-words wheel not reachable: {e}")
    finally:
        offline.english_words.cache_clear()
    try:
        assert "thou" not in words and "hath" not in words and "tomato" in words
        assert modern_english_share("The tomato is a plant whose fruit is an edible berry.") >= 0.9
        assert modern_english_share("Thou hast not the wit, for thy tongue doth wag.") < 0.7
    finally:
        everyday.english_word_list.cache_clear()


# --- ending the turn, and the aggregate ---------------------------------------------------------

def test_only_the_assistant_end_token_ends_the_turn():
    assert ends_turn("stop")
    assert not ends_turn("length") and not ends_turn("error") and not ends_turn(None)


def test_score_replies_aggregates_and_picks_one_sample_of_each_kind(monkeypatch):
    import picochat.evals.everyday as everyday
    monkeypatch.setattr(everyday, "english_word_list", lambda: WORDS)
    canned = TOPICS["abilities"][1][1]
    records = [
        ({"messages": [{"role": "user", "content": "Hello!"}], "kind": "greeting", "topic": None},
         "Hello! How can I help you today?", "stop"),
        ({"messages": [{"role": "user", "content": "Who are you?"}], "kind": "identity", "topic": "picochat"},
         TOPICS["name"][1][0], "stop"),
        ({"messages": [{"role": "user", "content": "What is a hat?"}], "kind": "topic", "topic": "Hat"},
         "A hat is a head cover.", "stop"),
        ({"messages": [{"role": "user", "content": "Tell me about Lisbon."}], "kind": "topic", "topic": "Lisbon"},
         canned, "length"),
        ("What is the weather like?", "Thou art a villain.", True),  # a plain string: kind 'other'
    ]
    scores, samples = score_replies(records, num_samples=4)
    assert scores["prompts"] == 5
    assert scores["topic_on_topic"] == 0.5            # the hat, not Lisbon
    assert scores["canned"] == 1 / 4                   # Lisbon's reply, of the 4 non-identity prompts
    assert scores["ends_turn"] == 4 / 5
    assert scores["early_modern"] == 1 / 5
    assert scores["passed"] == 3 / 4                   # greeting, identity, hat; not Lisbon
    assert [p for p, _ in samples] == ["Hello!", "Who are you?", "What is a hat?", "What is the weather like?"]


# --- the Everyday task --------------------------------------------------------------------------

def test_everyday_prompts_ask_about_held_out_titles_and_grade_replies(home):
    fx.install(home)
    from picochat.tasks.everyday import GENERAL, GREETINGS, IDENTITY, Everyday
    task = Everyday()
    kinds = [c["kind"] for c in task]
    assert kinds.count("greeting") == len(GREETINGS) and kinds.count("identity") == len(IDENTITY)
    assert kinds.count("general") == len(GENERAL)
    topics = [c for c in task if c["kind"] in ("topic", "follow-up")]
    assert {c["topic"] for c in topics} == fx.HELD_OUT_TITLES  # the fixture has three plain held-out titles
    follow = [c for c in task if c["kind"] == "follow-up"]
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant", "user"] for c in follow)
    lisbon = next(c for c in task if c["topic"] == "Lisbon")
    assert lisbon["messages"][-1]["content"] in ("What is Lisbon?", "Tell me about Lisbon.") or "Lisbon" in lisbon["messages"][-1]["content"]
    identity = next(c for c in task if c["kind"] == "identity")
    assert task.evaluate(identity, TOPICS["name"][1][0])
    assert not task.evaluate(identity, "A hat is a head cover.")
    assert not task.evaluate(lisbon, TOPICS["abilities"][1][1])
