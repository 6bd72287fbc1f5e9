"""
Tests for chat rendering in picochat/tokenizer.py (docs/DESIGN.md#chat-format): which tokens a conversation becomes and
which of them the model is trained on (mask 1).

The expected sequences are written out by hand from encode/encode_special, so a change in the
format shows up here as a precise diff.

    pytest -q tests/test_chat_render.py
"""
from __future__ import annotations

import copy

import pytest

from picochat.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. What is 12*7? It is 84. "
        "Please compute the sum of 3 and 4 with python, then explain. 😀 東京 ") * 40


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], 300)


def conversation_with_everything():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "It is 84."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome 😀"},
    ]}


def test_masks_train_only_on_the_assistant_words_and_tool_calls(tok):
    sp, enc = tok.encode_special, tok.encode
    expected = [(tok.bos_id, 0)]
    expected += [(sp("<|user_start|>"), 0)] + [(t, 0) for t in enc("Be brief.\n\nWhat is 12*7?")]
    expected += [(sp("<|user_end|>"), 0), (sp("<|assistant_start|>"), 0)]
    expected += [(t, 1) for t in enc("Let me compute. ")]
    expected += [(sp("<|python_start|>"), 1)] + [(t, 1) for t in enc("12*7")] + [(sp("<|python_end|>"), 1)]
    expected += [(sp("<|output_start|>"), 0)] + [(t, 0) for t in enc("84")] + [(sp("<|output_end|>"), 0)]
    expected += [(t, 1) for t in enc("It is 84.")] + [(sp("<|assistant_end|>"), 1)]
    expected += [(sp("<|user_start|>"), 0)] + [(t, 0) for t in enc("Thanks")] + [(sp("<|user_end|>"), 0)]
    expected += [(sp("<|assistant_start|>"), 0)] + [(t, 1) for t in enc("You're welcome 😀")]
    expected += [(sp("<|assistant_end|>"), 1)]

    ids, mask = tok.render_conversation(conversation_with_everything())
    assert list(zip(ids, mask)) == expected
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 12*7?<|user_end|>")


def test_a_string_assistant_content_equals_one_text_part(tok):
    as_string = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    as_parts = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}
    assert tok.render_conversation(as_string) == tok.render_conversation(as_parts)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "message 2 has role 'assistant' where 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
      {"role": "system", "content": "s"}], "message 2 has role 'system'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "system message must be followed by a user message"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "user content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}],
     "unknown content part type 'image'"),
    ([], "no messages"),
])
def test_bad_conversations_are_refused_with_the_reason(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        tok.render_conversation({"messages": messages})


def test_ids_and_mask_are_truncated_together(tok):
    full_ids, full_mask = tok.render_conversation(conversation_with_everything())
    ids, mask = tok.render_conversation(conversation_with_everything(), max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])
    long = {"messages": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]}
    ids, mask = tok.render_conversation(long)
    assert len(ids) == len(mask) == 2048


def test_render_for_completion_drops_the_last_reply_and_opens_a_new_one(tok):
    conversation = conversation_with_everything()
    original = copy.deepcopy(conversation)
    prompt = tok.render_for_completion(conversation)
    assert conversation == original  # the caller's conversation is untouched
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    without_last = {"messages": conversation["messages"][:-1]}
    assert prompt == tok.render_conversation(without_last)[0] + [tok.encode_special("<|assistant_start|>")]
    # a conversation that already ends with the user's turn is a prompt as it stands
    assert tok.render_for_completion(without_last) == prompt


def test_visualization_marks_trained_tokens(tok, capsys):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi\nthere"},
                                                      {"role": "assistant", "content": "ok"}]})
    plain = tok.visualize_tokenization(ids, mask, color=False)
    assert plain.startswith("<|bos|>|<|user_start|>|")
    assert "\\n" in plain and "\n" not in plain
    reply = "|".join(tok.decode([t]) for t in tok.encode("ok"))
    assert plain.endswith(f"<|assistant_start|>|[[{reply}|<|assistant_end|>]]")
    assert "\033[" not in plain
    assert tok.visualize_tokenization(ids, mask) == plain  # capsys: stdout is not a terminal
    colored = tok.visualize_tokenization(ids, mask, color=True)
    assert "\033[1;32m<|assistant_end|>\033[0m" in colored
    assert "\033[2;37m<|bos|>\033[0m" in colored
