"""Shared test fixtures: an isolated PICOCHAT_HOME and a tiny byte-level tokenizer."""
import pytest


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
