"""
The pretraining loader: reads shards, tokenizes on the fly, and packs documents into rows with
BOS-aligned best-fit packing (docs/DESIGN.md#pretraining-data).

- Every row starts with a document's BOS token; a row of T+1 tokens gives T inputs and T targets.
- For each row, the largest buffered document that still fits is placed, again and again; when
  nothing fits, the shortest buffered document is cropped to fill the row exactly. No padding.
- The data is split into S disjoint *streams*: row groups are dealt round-robin over the whole
  dataset (global row-group counter g; stream i reads those with g % S == i). Training uses one
  stream per micro-batch of a step (S = grad_accum × world_size) and rank r runs streams
  r, r+W, r+2W, ... So ranks read disjoint data, and a step sees the same rows whatever the
  number of processes: 2 processes give the same losses as 1 process with twice the accumulation.
- `state_dict()` captures everything, including the buffered tokenized documents, so a restored
  loader yields exactly the batches an uninterrupted one would have.

    loader = PackingLoader("demo", "train", tokenizer, batch_size=32, seq_len=512, stream=0, num_streams=1)
    inputs, targets = loader.next_batch()
"""
from __future__ import annotations

import bisect

import torch

from picochat.common import PicochatError
from picochat.data import to_device
from picochat.data.shards import list_shards, open_shard, read_row_group

TOKENIZE_BATCH = 128  # documents handed to the tokenizer at once


class PackingLoader:
    def __init__(self, dataset: str, split: str, tokenizer, batch_size: int, seq_len: int,
                 stream: int = 0, num_streams: int = 1, buffer_docs: int = 1000,
                 device: torch.device | str = "cpu", state: dict | None = None):
        self.paths = list_shards(dataset, split)
        self.tokenizer, self.bos = tokenizer, tokenizer.bos_id
        self.B, self.T = batch_size, seq_len
        self.stream, self.num_streams = stream, num_streams
        self.buffer_docs = buffer_docs
        self.device = torch.device(device)
        # Reading position: the row group being consumed and the next document in it.
        self.epoch, self.file, self.rg, self.doc = 0, 0, -1, 0
        self.global_rg = -1  # global index of (file, rg) over the dataset, for stream striding
        self.texts: list[str] = []
        # Buffer of tokenized documents, kept sorted by length (parallel lists) for best-fit search.
        self.lengths: list[int] = []
        self.docs: list[list[int]] = []
        self._row_groups = {}  # file index -> number of row groups (lazily read footers)
        self.total_tokens = 0
        self.docs_packed = 0  # documents placed in rows so far (not saved: evaluation only)
        self.tokens_cropped = 0  # tokens cut off documents and never trained on (not saved: a measurement)
        if state is not None:
            self.load_state_dict(state)

    # --- reading documents ---------------------------------------------------------------

    def _num_row_groups(self, file: int) -> int:
        if file not in self._row_groups:
            self._row_groups[file] = open_shard(self.paths[file]).num_row_groups
        return self._row_groups[file]

    def _advance_row_group(self) -> None:
        """Move to the next row group of this stream (wrapping into a new epoch)."""
        start = (self.epoch, self.file, self.rg)
        while True:
            self.rg += 1
            if self.rg >= self._num_row_groups(self.file):
                self.file, self.rg = self.file + 1, 0
                if self.file >= len(self.paths):
                    self.epoch, self.file, self.global_rg = self.epoch + 1, 0, -1
                    if start[0] < self.epoch - 1:
                        raise PicochatError(
                            f"stream {self.stream} of {self.num_streams} gets no row group of "
                            f"{len(self.paths)} shard(s); add data or use a larger device batch")
            self.global_rg += 1
            if self.global_rg % self.num_streams == self.stream:
                break
        pf = open_shard(self.paths[self.file])
        self.texts = read_row_group(self.paths[self.file], pf, self.rg)
        self.doc = 0

    def _refill(self) -> None:
        """Tokenize more documents until the buffer holds `buffer_docs` of them."""
        while len(self.docs) < self.buffer_docs:
            if self.doc >= len(self.texts):
                self._advance_row_group()
                continue
            batch = self.texts[self.doc:self.doc + TOKENIZE_BATCH]
            self.doc += len(batch)
            for ids in self.tokenizer.encode(batch, prepend=self.bos):
                i = bisect.bisect_left(self.lengths, len(ids))
                self.lengths.insert(i, len(ids))
                self.docs.insert(i, ids)

    # --- packing ---------------------------------------------------------------------------

    def _pack_row(self, out: torch.Tensor) -> None:
        """Fill `out` (T+1 tokens) with whole documents, best fit first, cropping the last one."""
        filled, capacity = 0, out.numel()
        while filled < capacity:
            self._refill()
            remaining = capacity - filled
            i = bisect.bisect_right(self.lengths, remaining) - 1  # largest that fits entirely
            if i >= 0:
                ids = self.docs.pop(i)
                self.lengths.pop(i)
            else:  # nothing fits: crop the shortest document to fill the row exactly
                ids = self.docs.pop(0)
                self.lengths.pop(0)
                self.tokens_cropped += len(ids) - remaining
                ids = ids[:remaining]
            out[filled:filled + len(ids)] = torch.tensor(ids, dtype=torch.long)
            filled += len(ids)
            self.docs_packed += 1
        self.total_tokens += capacity

    def stream_docs(self) -> int:
        """About how many documents one pass over this stream's share of the split holds."""
        total = sum(open_shard(p).metadata.num_rows for p in self.paths)
        return max(1, total // self.num_streams)

    def one_pass(self, max_batches: int):
        """Up to `max_batches` batches, stopping once a whole pass over the stream is packed
        (evaluating a document twice adds nothing). Use a buffer well below the split's size, or
        best fit keeps picking the same large documents from a buffer that holds several copies."""
        limit = self.stream_docs()
        for _ in range(max_batches):
            if self.docs_packed >= limit:
                return
            yield self.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty((self.B, self.T + 1), dtype=torch.long)
        for b in range(self.B):
            self._pack_row(rows[b])
        batch = to_device(torch.stack([rows[:, :-1], rows[:, 1:]]), self.device)  # new memory each call
        return batch[0], batch[1]

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- exact resume ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        lengths = torch.tensor(self.lengths, dtype=torch.int64)
        flat = torch.tensor([t for d in self.docs for t in d], dtype=torch.int32)
        return {"epoch": self.epoch, "file": self.file, "rg": self.rg, "doc": self.doc,
                "global_rg": self.global_rg, "stream": self.stream, "num_streams": self.num_streams,
                "num_files": len(self.paths), "buffer_lengths": lengths, "buffer_tokens": flat}

    def load_state_dict(self, state: dict) -> None:
        if state["num_streams"] != self.num_streams or state["stream"] != self.stream:
            raise PicochatError(f"loader state is for stream {state['stream']} of {state['num_streams']}, "
                                f"not {self.stream} of {self.num_streams}; resume with the same "
                                f"device batch size and total batch size")
        if state["num_files"] != len(self.paths):
            raise PicochatError(f"the dataset had {state['num_files']} shards when the checkpoint was "
                                f"written and has {len(self.paths)} now; restore the same shards to resume")
        self.epoch, self.file, self.rg = state["epoch"], state["file"], state["rg"]
        self.doc, self.global_rg = state["doc"], state["global_rg"]
        self.lengths = state["buffer_lengths"].tolist()
        flat = state["buffer_tokens"].tolist()
        self.docs, pos = [], 0
        for n in self.lengths:
            self.docs.append(flat[pos:pos + n])
            pos += n
        self.texts = []
        if self.rg >= 0:
            self.texts = read_row_group(self.paths[self.file], open_shard(self.paths[self.file]), self.rg)
