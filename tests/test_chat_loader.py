"""ChatPacker: whole conversations per row, masks become ignored targets, exact resume."""
import torch

from picochat.data.chat_loader import ChatPacker
from picochat.tasks.base import Task


class Numbered(Task):
    """Conversation i renders as BOS, i, then i % 7 + 2 tokens with alternating masks."""
    def __init__(self, n=300, **kw):
        super().__init__(**kw)
        self.n = n

    eval_type = "generative"

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"id": i}


class StubTokenizer:
    bos_id = 0

    def render_conversation(self, conv, max_tokens=2048):
        i = conv["id"]
        ids = [0, 1000 + i] + [5] * (i % 7 + 2)
        mask = [0, 0] + [(j % 2) for j in range(i % 7 + 2)]
        return ids[:max_tokens], mask[:max_tokens]


def test_rows_hold_whole_conversations_and_masked_tokens_are_ignored():
    packer = ChatPacker(Numbered(), StubTokenizer(), batch_size=4, seq_len=15, buffer_size=8)
    seen = []
    for _ in range(20):
        x, y = packer.next_batch()
        assert (x[:, 0] == 0).all()  # every row starts at a conversation's BOS
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            full = row_x + [None]
            for t, tok in enumerate(row_x):
                if tok >= 1000:  # a conversation's id token: the whole conversation follows
                    i = tok - 1000
                    seen.append(i)
                    length = i % 7 + 2
                    assert full[t + 1:t + 1 + length][:len(row_x) - t - 1] == [5] * min(length, len(row_x) - t - 1)
                    assert row_y[t - 1] == -1  # the id token's own target is masked (mask 0)
    assert len(set(seen)) == len(seen)  # no conversation twice within an epoch


def test_padding_targets_are_ignored():
    # one conversation of 4 tokens, rows of 15: three copies fit, then 3 tokens of padding
    packer = ChatPacker(Numbered(n=1), StubTokenizer(), batch_size=1, seq_len=14, buffer_size=2)
    x, y = packer.next_batch()
    assert x[0].tolist() == [0, 1000, 5, 5] * 3 + [0, 0]
    assert (y[0, -3:] == -1).all()


def test_restored_state_reproduces_the_following_batches():
    kwargs = dict(batch_size=3, seq_len=20, buffer_size=10, stream=1, num_streams=2)
    a = ChatPacker(Numbered(), StubTokenizer(), **kwargs)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(60)]  # crosses the epoch boundary
    b = ChatPacker(Numbered(), StubTokenizer(), state=state, **kwargs)
    for ex, got in zip(expected, (b.next_batch() for _ in range(60))):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])
    assert a.epoch >= 1


def test_a_batch_still_in_flight_is_never_overwritten_by_the_next_one(monkeypatch):
    # As for the pretraining loader: a non-blocking copy to the GPU may read the host batch after
    # the next one is packed; here the "device" batch is the host memory itself.
    from picochat.data import chat_loader
    monkeypatch.setattr(chat_loader, "to_device", lambda batch, device: batch)
    packer = ChatPacker(Numbered(), StubTokenizer(), batch_size=4, seq_len=15, buffer_size=8)
    batches = [packer.next_batch() for _ in range(5)]
    snapshots = [(x.clone(), y.clone()) for x, y in batches]
    for _ in range(5):
        packer.next_batch()
    for (x, y), (x0, y0) in zip(batches, snapshots):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_each_batch_counts_its_supervised_targets_on_the_host():
    packer = ChatPacker(Numbered(), StubTokenizer(), batch_size=4, seq_len=15, buffer_size=8)
    for _ in range(5):
        _, y = packer.next_batch()
        assert packer.last_supervised == int((y >= 0).sum())
