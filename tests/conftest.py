"""Shared test fixtures: an isolated PICOCHAT_HOME, a tiny byte-level tokenizer, and a tiny
dataset + trained tokenizer for end-to-end stage runs."""
import os

import pytest

from picochat.common import data_dir, tokenizer_dir
from picochat.data.shards import write_shard


class ByteTokenizer:
    """Bytes 0-255 plus BOS=256: enough to test packing without training a BPE."""
    bos_id = 256
    vocab_size = 257

    def encode(self, texts, prepend=None):
        single = isinstance(texts, str)
        out = []
        for t in [texts] if single else texts:
            ids = list(t.encode("utf-8"))
            out.append(([prepend] if prepend is not None else []) + ids)
        return out[0] if single else out

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


WORDS = ("the king queen lord lady good my noble sir what shall we do now come go away love death "
         "night day heaven earth speak hear see know think brave sweet fair foul true false").split()


def make_corpus(n_docs: int, seed: int) -> list[str]:
    import random
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))).capitalize() + rng.choice(".!?,;")
                 for _ in range(rng.randint(2, 12))]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """A PICOCHAT_HOME with a small dataset and a 512-token tokenizer."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    try:
        from picochat.tokenizer import train_tokenizer
        docs = make_corpus(1200, seed=0)
        for i in range(3):
            write_shard(data_dir("tiny") / f"shard_{i:05d}.parquet", docs[i::3], row_group_size=50)
        write_shard(data_dir("tiny") / "val_00000.parquet", make_corpus(60, seed=1), row_group_size=20)
        train_tokenizer(iter(docs), vocab_size=512).save(tokenizer_dir())
    finally:
        if old is None:
            del os.environ["PICOCHAT_HOME"]
        else:
            os.environ["PICOCHAT_HOME"] = old
    return home


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are a few thousand weights: extra threads only add synchronization, which turns
    tiny ops from microseconds into milliseconds on a busy machine (measured 0.25 s vs 2 ms per
    forward with 2 threads on a loaded 2-core box). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
