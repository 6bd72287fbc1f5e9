"""
SmolTalk: general chat conversations for midtraining and SFT. HF `HuggingFaceTB/smol-smoltalk`
(train ~460K, test ~24K conversations), already in chat format: `messages` is a list of
{role, content} with an optional system message first, then user and assistant turns alternating,
ending with the assistant. Rows that break that shape are skipped and counted (`.skipped`).

There is no offline source: without the Hub (or a mirror in HF_ENDPOINT, or files cached by an
earlier run) this task can't be built, and the error says so. It is training data, so there is
no right answer to `evaluate`.

    SmolTalk(split="train")            # ~460K conversations, shuffled with seed 42
    SmolTalk(split="test", stop=1000)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from picochat.tasks.hub import RowTask, Rows, open_rows


class SmolTalk(RowTask):

    def __init__(self, split: str = "train", source: str = "auto", **kwargs):
        rows, used = open_rows("SmolTalk", "HuggingFaceTB/smol-smoltalk", "default", split, source,
                               offline=None, offline_note="it is not on PyPI")
        self.split = split
        super().__init__(rows, used, **kwargs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def valid_rows(self, rows: Rows) -> np.ndarray:
        """Checked on the Arrow columns at once (460K rows in well under a second), not row by row."""
        try:
            return well_formed(rows.table.column("messages"))
        except (KeyError, pa.ArrowException, TypeError):
            return np.zeros(len(rows), dtype=bool)  # no usable messages column: every row is malformed

    def convert(self, row: dict) -> dict | None:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("SmolTalk is training data; it has no right answer to check")


def well_formed(messages: pa.ChunkedArray) -> np.ndarray:
    """Per row: an optional system message, then user/assistant alternating, at least one pair,
    ending with the assistant, every content a string."""
    messages = messages.combine_chunks()
    n = len(messages)
    lengths = pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(messages)
    if not pa.types.is_string(flat.type.field("content").type):
        return np.zeros(n, dtype=bool)
    role = flat.field("role")
    is_role = {r: pc.fill_null(pc.equal(role, r), False).to_numpy(zero_copy_only=False)
               for r in ("system", "user", "assistant")}
    has_content = flat.field("content").is_valid().to_numpy(zero_copy_only=False)
    # each message's position inside its conversation
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(flat)) - starts[parent]
    first = position == 0
    has_system = np.zeros(n, dtype=bool)
    has_system[parent[first]] = is_role["system"][first]
    turn = position - has_system[parent]  # 0 for the first user message
    expected = np.where(turn % 2 == 0, is_role["user"], is_role["assistant"])
    ok = has_content & (expected & (turn >= 0) | is_role["system"] & first)
    bad = np.bincount(parent, weights=~ok, minlength=n)
    turns = lengths - has_system
    return (bad == 0) & (turns >= 2) & (turns % 2 == 0) & messages.is_valid().to_numpy(zero_copy_only=False)
