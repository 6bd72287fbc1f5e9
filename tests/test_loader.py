"""The packing loader: BOS-aligned rows, disjoint streams, exact resume, clear errors on bad shards."""
import pytest
import torch

from picochat.common import PicochatError, data_dir
from picochat.data.loader import PackingLoader
from picochat.data.shards import write_shard


def make_dataset(name="toy", shards=3, docs_per_shard=120, row_group_size=20):
    """Documents 'doc0001 xxx...' of varied lengths, so each can be identified by its prefix."""
    n = 0
    for s in range(shards):
        texts = []
        for _ in range(docs_per_shard):
            texts.append(f"doc{n:04d} " + "abcdefghij"[n % 10] * (5 + (n * 37) % 90))
            n += 1
        write_shard(data_dir(name) / f"shard_{s:05d}.parquet", texts, row_group_size=row_group_size)
    write_shard(data_dir(name) / "val_00000.parquet", ["val doc " * 20] * 30, row_group_size=10)


def doc_ids_in(batch, tok):
    """Ids of the documents that start (right after a BOS) inside a batch of inputs."""
    ids = set()
    for row in batch.tolist():
        for i, t in enumerate(row):
            if t == tok.bos_id and i + 8 <= len(row):
                ids.add(tok.decode(row[i + 1:i + 8]))
    return ids


def test_every_row_starts_with_bos_and_targets_are_shifted_inputs(home, byte_tokenizer):
    make_dataset()
    loader = PackingLoader("toy", "train", byte_tokenizer, batch_size=4, seq_len=64)
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 64)
        assert (x[:, 0] == byte_tokenizer.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_restored_state_reproduces_the_following_batches(home, byte_tokenizer):
    make_dataset(shards=2, docs_per_shard=40, row_group_size=10)
    kwargs = dict(batch_size=3, seq_len=48, buffer_docs=16)
    a = PackingLoader("toy", "train", byte_tokenizer, **kwargs)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(40)]  # enough to cross row groups, shards and epochs
    b = PackingLoader("toy", "train", byte_tokenizer, state=state, **kwargs)
    for (x, y), (bx, by) in zip(expected, (b.next_batch() for _ in range(40))):
        assert torch.equal(x, bx) and torch.equal(y, by)
    assert a.epoch >= 1, "the test should cover an epoch boundary"


def test_streams_read_disjoint_documents(home, byte_tokenizer):
    make_dataset()
    seen = []
    for stream in range(2):
        loader = PackingLoader("toy", "train", byte_tokenizer, batch_size=2, seq_len=64,
                               stream=stream, num_streams=2, buffer_docs=8)
        ids = set()
        for _ in range(25):  # less than one epoch of each stream's share
            ids |= doc_ids_in(loader.next_batch()[0], byte_tokenizer)
        seen.append(ids)
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]


def test_state_from_another_stream_layout_is_refused(home, byte_tokenizer):
    make_dataset()
    state = PackingLoader("toy", "train", byte_tokenizer, 2, 32, stream=0, num_streams=2).state_dict()
    with pytest.raises(PicochatError, match="same device batch size"):
        PackingLoader("toy", "train", byte_tokenizer, 2, 32, stream=0, num_streams=1, state=state)


def test_truncated_shard_gives_an_error_naming_the_file(home, byte_tokenizer):
    make_dataset()
    path = data_dir("toy") / "shard_00001.parquet"
    path.write_bytes(path.read_bytes()[:200])
    loader = PackingLoader("toy", "train", byte_tokenizer, batch_size=4, seq_len=64)
    with pytest.raises(PicochatError, match="shard_00001.parquet"):
        for _ in range(200):
            loader.next_batch()


def test_missing_dataset_says_how_to_get_it(home, byte_tokenizer):
    with pytest.raises(PicochatError, match="picochat data demo"):
        PackingLoader("demo", "train", byte_tokenizer, 2, 32)


def test_one_pass_stops_after_every_document_was_packed_once(home, byte_tokenizer):
    make_dataset(shards=1, docs_per_shard=40, row_group_size=10)
    loader = PackingLoader("toy", "train", byte_tokenizer, batch_size=2, seq_len=64, buffer_docs=8)
    seen = set()
    batches = list(loader.one_pass(max_batches=1000))
    for x, _ in batches:
        seen |= doc_ids_in(x, byte_tokenizer)
    assert 0 < len(batches) < 1000
    assert loader.docs_packed >= 40 and loader.docs_packed < 40 + 2 * 64  # about one pass, not many
    assert len(seen) >= 30  # nearly every document starts inside some row



def test_a_batch_still_in_flight_is_never_overwritten_by_the_next_one(home, byte_tokenizer, monkeypatch):
    # On CUDA a batch is copied to the GPU without blocking: the copy may run after next_batch()
    # returns and after the loader packs the next batch. Simulate the latest possible copy: the
    # "device" batch is the host memory itself, read only at the end. Packing later batches must
    # not change what an earlier batch holds (a reused staging buffer did).
    from picochat.data import loader as loader_module
    monkeypatch.setattr(loader_module, "to_device", lambda batch, device: batch)
    make_dataset()
    loader = PackingLoader("toy", "train", byte_tokenizer, batch_size=4, seq_len=64)
    batches = [loader.next_batch() for _ in range(6)]
    snapshots = [(x.clone(), y.clone()) for x, y in batches]
    for _ in range(6):
        loader.next_batch()
    for (x, y), (x0, y0) in zip(batches, snapshots):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_cropped_tokens_are_counted_and_documents_that_fit_lose_only_row_tails(home, byte_tokenizer):
    """tokens_cropped measures what the packer never trains on (docs/DATA.md): a document longer than
    a row loses everything past the row; documents that fit lose at most a row's unfillable tail."""
    write_shard(data_dir("long") / "shard_00000.parquet", ["x" * 500] * 8, row_group_size=2)
    loader = PackingLoader("long", "train", byte_tokenizer, batch_size=1, seq_len=64, buffer_docs=4)
    for _ in range(8):
        loader.next_batch()
    assert loader.tokens_cropped == 8 * (501 - 65)  # BOS + 500 bytes, of which a row keeps 65
    write_shard(data_dir("fit") / "shard_00000.parquet", ["y" * 31] * 40, row_group_size=8)
    loader = PackingLoader("fit", "train", byte_tokenizer, batch_size=1, seq_len=63, buffer_docs=8)
    for _ in range(10):
        loader.next_batch()
    assert loader.tokens_cropped == 0  # 32-token documents fill 64-token rows exactly
