"""
Tests for picochat/tokenizer.py and the tok_train / tok_eval stages.

Hermetic and fast: tokenizers of a few hundred tokens trained on text generated here (English-like
sentences with numbers, code, CJK and emoji). A slow pure-Python BPE trainer (minbpe style) pins
rustbpe + the split pattern: both must learn the same merges and give the same ids.

    pytest -q tests/test_tokenizer.py
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from picochat.__main__ import main as picochat_main
from picochat.common import PicochatError, data_dir
from picochat.data.shards import shard_name, write_shard
from picochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer, train_tokenizer

# -----------------------------------------------------------------------------
# Built-in training text

WORDS = ("the of and to in is was for on with as by at from that this it are be has had not but "
         "river stone light garden market engine paper window music winter letter mountain signal "
         "quiet bright heavy slowly carefully number system model train token value count small "
         "large first last morning evening doctor teacher village station").split()
CONTRACTIONS = ["don't", "it's", "we'll", "they've", "you're", "I'm", "she'd", "DON'T", "We'LL"]
CJK = "我们你他她是的了在有人这中大为上个国不以会到说时要就出也得里后自学生天气日本東京語한국어서울봄꽃"
EMOJI = [chr(c) for c in range(0x1F600, 0x1F650)]  # 80 faces, all sharing the lead bytes F0 9F
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)\n", "if (a && b) { c++; }\r\n"]


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic documents mixing every kind of text the split pattern treats differently."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(3, 8)):
            words = rng.choices(WORDS, k=rng.randint(4, 12))
            words[0] = words[0].capitalize()
            if rng.random() < 0.4:
                words.insert(rng.randrange(len(words)), rng.choice(CONTRACTIONS))
            if rng.random() < 0.4:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 7))))
            if rng.random() < 0.5:
                words.append("".join(rng.choices(CJK, k=rng.randint(2, 8))))
            if rng.random() < 0.5:
                words.append("".join(rng.choices(EMOJI, k=rng.randint(1, 4))))
            parts.append(" ".join(words) + rng.choice([".", "!", "?", ",", ";", "..."]))
        if rng.random() < 0.3:
            parts.append("\n" + rng.choice(CODE))
        docs.append(rng.choice([" ", "  ", "\n", "\n\n"]).join(parts))
    return docs


TRAIN_DOCS = make_docs(1500, seed=0)  # about 250 KB
SAMPLE_TEXTS = make_docs(40, seed=1) + [
    "", " ", "a", "12345678901", "   leading and trailing   ", "tabs\tand\r\nnewlines\n\n\n",
    "HELLO WORLD I'LL YOU'RE", "unseen: Ω≈ç√∫ ñ ü ß 🌍🚀 👩‍👩‍👧 ﷽", "<|bos|> is text here",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TRAIN_DOCS, 512)


# -----------------------------------------------------------------------------
# Vocabulary and special tokens

def test_special_tokens_follow_the_ranks_in_spec_order(tok):
    assert tok.vocab_size == 512
    assert tok.bos_id == 512 - 9
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(512 - 9, 512))
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                              "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                              "<|output_start|>", "<|output_end|>"]
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|endoftext|>")


def test_vocab_smaller_than_bytes_plus_specials_is_refused():
    with pytest.raises(PicochatError, match="at least 266"):
        train_tokenizer(TRAIN_DOCS[:10], 265)


# -----------------------------------------------------------------------------
# Encoding and decoding

def test_round_trip_with_emoji_cjk_and_special_tokens(tok):
    text = "<|bos|><|user_start|>Hello 世界, 東京の天気は? 😀🌍 ok<|user_end|><|assistant_start|>Sure 👍<|assistant_end|>"
    ids = tok.encode(text, allowed_special=True)
    specials = [i for i in ids if i >= tok.bos_id]
    assert specials == [tok.encode_special(n) for n in
                        ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]]
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text
    # by default the same characters are plain text: user content can't forge a special token
    plain = tok.encode(text)
    assert all(i < tok.bos_id for i in plain)
    assert tok.decode(plain) == text
    for sample in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(sample)) == sample


def test_prepend_and_append_take_ids_or_special_names(tok):
    body = tok.encode("hello world")
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [tok.bos_id] + body + [end]
    assert tok.encode(["hello world"], prepend=tok.bos_id) == [[tok.bos_id] + body]


def test_batch_encode_equals_single_encode(tok):
    single = [tok.encode(t, prepend="<|bos|>") for t in SAMPLE_TEXTS]
    assert tok.encode(SAMPLE_TEXTS, prepend="<|bos|>") == single
    assert tok.encode(SAMPLE_TEXTS, prepend="<|bos|>", num_threads=1) == single
    with_specials = ["<|bos|>a", "b<|user_end|>"]
    assert tok.encode(with_specials, allowed_special=True) == [tok.encode(t, allowed_special=True)
                                                               for t in with_specials]


def test_tiktoken_encoding_matches_rustbpe_encoding():
    import rustbpe
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(TRAIN_DOCS), 700 - 9, pattern=SPLIT_PATTERN)
    ours = train_tokenizer(TRAIN_DOCS, 700)
    ranks = dict(trainer.get_mergeable_ranks())
    assert ours.tokens == sorted(ranks, key=ranks.get)  # training is rustbpe's, deterministically
    for text in SAMPLE_TEXTS + TRAIN_DOCS[:50]:
        assert ours.encode(text) == trainer.encode(text), text


# -----------------------------------------------------------------------------
# token_bytes

def test_token_bytes_of_partial_utf8_tokens_are_their_raw_length(tok):
    lengths = tok.token_bytes()
    assert lengths.dtype == torch.int32 and lengths.shape == (tok.vocab_size,)
    assert lengths[tok.bos_id:].tolist() == [0] * 9
    partial = []
    for token_id in range(256, tok.bos_id):
        raw = tok.id_to_bytes(token_id)
        assert lengths[token_id] == len(raw)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(raw)
    # the emoji share lead bytes F0 9F, so BPE merges pieces of characters; decoding those to str
    # and re-encoding (nanochat's seed bug) would count U+FFFD's 3 bytes instead of their own
    assert b"\xf0\x9f" in partial
    assert any(len(raw.decode("utf-8", errors="replace").encode("utf-8")) != len(raw) for raw in partial)


# -----------------------------------------------------------------------------
# Saving and loading

def test_save_load_round_trip_gives_identical_ids_and_token_bytes(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
    assert loaded.encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # token bytes come from the tokens


def test_later_stages_default_to_the_dataset_the_tokenizer_was_trained_on(tok, tmp_path):
    from picochat.tokenizer import default_dataset
    tok.trained_on = "demo"
    tok.save(tmp_path)
    assert default_dataset(Tokenizer.load(tmp_path)) == "demo"
    tok.trained_on = None  # a tokenizer saved before the dataset was recorded: the old default
    tok.save(tmp_path)
    assert default_dataset(Tokenizer.load(tmp_path)) == "fineweb-edu"


def test_missing_tokenizer_says_to_run_tok_train(tmp_path, monkeypatch):
    hint = "run `picochat tok_train` first"
    with pytest.raises(PicochatError, match=f"no tokenizer in .*nowhere; {hint}"):
        Tokenizer.load(tmp_path / "nowhere")
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    with pytest.raises(PicochatError, match=hint):
        get_tokenizer()


def test_corrupt_tokenizer_file_is_a_clear_error(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"format": "picochat-tokenizer/1", "pattern"')
    with pytest.raises(PicochatError, match="unreadable.*tok_train"):
        Tokenizer.load(tmp_path)


# -----------------------------------------------------------------------------
# The split pattern and rustbpe, pinned against a slow pure-Python BPE

def test_split_pattern_chunks():
    # digits go in pairs; contractions split off case-insensitively; a run of spaces leaves its last
    # character to the next word, and any one non-letter (here a tab) may lead a word
    regex = pytest.importorskip("regex")
    text = "I'LL pay 1234567 for don't\n\n  it's 😀😀 ok   \tend"
    assert regex.findall(SPLIT_PATTERN, text) == [
        "I", "'LL", " pay", " ", "12", "34", "56", "7", " for", " don", "'t", "\n\n", " ", " it", "'s",
        " 😀😀", " ok", "   ", "\tend"]


def reference_train(docs: list[str], num_merges: int) -> list[bytes]:
    """minbpe-style BPE: count adjacent pairs within regex chunks, merge the most frequent, repeat.
    Ties go to the smallest pair (rustbpe's deterministic tie-break). Returns tokens in id order."""
    import regex
    chunks = [list(chunk.encode("utf-8")) for doc in docs for chunk in regex.findall(SPLIT_PATTERN, doc)]
    vocab = [bytes([b]) for b in range(256)]
    for new_id in range(256, 256 + num_merges):
        counts = Counter(pair for ids in chunks for pair in zip(ids, ids[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        chunks = [merge(ids, best, new_id) for ids in chunks]
    return vocab


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_encode(text: str, vocab: list[bytes]) -> list[int]:
    """Apply merges in the order they were learned, within each regex chunk."""
    import regex
    pair_to_id = {}
    for new_id in range(256, len(vocab)):
        # recover each merge's pair: the unique split of the token into two earlier tokens
        for cut in range(1, len(vocab[new_id])):
            left, right = vocab[new_id][:cut], vocab[new_id][cut:]
            if left in vocab[:new_id] and right in vocab[:new_id]:
                pair_to_id[(vocab.index(left), vocab.index(right))] = new_id
                break
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: pair_to_id.get(p, float("inf")))
            if pair not in pair_to_id:
                break
            ids = merge(ids, pair, pair_to_id[pair])
        out += ids
    return out


def test_rustbpe_matches_pure_python_bpe():
    pytest.importorskip("regex")
    docs = TRAIN_DOCS[:300]
    num_merges = 20
    ours = train_tokenizer(docs, 256 + num_merges + 9)
    reference = reference_train(docs, num_merges)
    assert ours.tokens == reference
    for text in SAMPLE_TEXTS[:20]:
        assert ours.encode(text) == reference_encode(text, reference)


# -----------------------------------------------------------------------------
# The stages

@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    write_shard(data_dir("tiny") / shard_name(0, "train"), TRAIN_DOCS, row_group_size=256)
    write_shard(data_dir("tiny") / shard_name(0, "val"), make_docs(100, seed=2))
    return tmp_path


def test_tok_train_cli_produces_a_loadable_tokenizer(tiny_dataset, capsys):
    assert picochat_main(["tok_train", "--dataset", "tiny", "--vocab-size", "400",
                          "--max-chars", "100_000"]) == 0
    out = capsys.readouterr().out
    assert "trained on 100,000 chars" in out and "vocab size 400" in out
    tok = get_tokenizer()
    assert tok.vocab_size == 400 and tok.bos_id == 391
    assert tok.trained_on == "tiny"  # base_train and base_eval default to this dataset
    assert tok.decode(tok.encode(TRAIN_DOCS[0])) == TRAIN_DOCS[0]


def test_tok_train_cli_errors_are_one_line(tiny_dataset, capsys):
    assert picochat_main(["tok_train", "--dataset", "tiny", "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "at least 266" in err and err.count("\n") == 1
    assert picochat_main(["tok_train", "--dataset", "absent"]) == 2
    err = capsys.readouterr().err
    assert "no train shards for dataset 'absent'" in err and err.count("\n") == 1
    assert not (tiny_dataset / "tokenizer").exists()


def test_tok_eval_shows_our_column_when_baselines_cannot_be_fetched(tiny_dataset, capsys, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    train_tokenizer(TRAIN_DOCS, 400).save(tiny_dataset / "tokenizer")
    assert picochat_main(["tok_eval", "--dataset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "gpt2: tiktoken's gpt2 is not available" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in
            ("news", "code", "math", "science", "korean", "tiny-train", "tiny-val")}
    assert len(rows) == 7
    assert float(rows["tiny-val"].split()[2]) > 1.5  # bytes per token: it compresses held-out text


def test_tok_eval_adds_a_column_per_baseline_it_can_load(tiny_dataset, capsys, monkeypatch):
    import tiktoken
    stand_in = train_tokenizer(TRAIN_DOCS[:100], 300).enc  # in place of a downloaded gpt2/cl100k
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    train_tokenizer(TRAIN_DOCS, 400).save(tiny_dataset / "tokenizer")
    assert picochat_main(["tok_eval", "--dataset", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("text"))
    assert "ours 400" in header and "gpt2 300" in header and "gpt4 300" in header
    news = next(line for line in lines if line.startswith("news"))
    assert len(news.split()) == 2 + 3 * 2  # label, bytes, then ratio and (tokens) per tokenizer
