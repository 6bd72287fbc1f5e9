"""
The conversation loader for midtraining and SFT: renders conversations with their loss masks and
packs them into rows, BOS-aligned and best fit, padding (never cropping) what is left of a row.

- Each row of T+1 tokens holds whole conversations; the largest buffered one that fits goes in
  first. When none fits, the rest of the row is padding (BOS tokens whose targets are ignored).
  A conversation longer than the row is truncated to it when rendered.
- Targets are -1 where the loss must not look: padding, and with mask_mode="assistant" every token
  the render mask marks 0 (user turns, tool outputs). mask_mode="all" trains on every real token
  (the seed's midtraining).
- As in the pretraining loader, the task is split into disjoint streams (conversation i belongs to
  stream i % S), one per micro-batch of a step, so results do not depend on the number of ranks;
  `state_dict()` restores the exact position and buffer.
"""
from __future__ import annotations

import bisect

import torch

from picochat.data import to_device


class ChatPacker:
    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, stream: int = 0,
                 num_streams: int = 1, mask_mode: str = "assistant", buffer_size: int = 100,
                 device: torch.device | str = "cpu", state: dict | None = None):
        if mask_mode not in ("assistant", "all"):
            raise ValueError(f"mask_mode must be 'assistant' or 'all', got {mask_mode!r}")
        if len(task) <= stream:
            from picochat.common import PicochatError
            raise PicochatError(f"the training mixture has {len(task)} conversations, too few for "
                                f"{num_streams} streams; use a smaller batch or more data")
        self.task, self.tokenizer = task, tokenizer
        self.B, self.T = batch_size, seq_len
        self.stream, self.num_streams = stream, num_streams
        self.mask_mode, self.buffer_size = mask_mode, buffer_size
        self.device = torch.device(device)
        self.pad = tokenizer.bos_id
        self.next_index = stream  # next conversation of this stream to render
        self.epoch = 0
        self.consumed = 0  # conversations packed into rows so far (for the epoch-based LR schedule)
        self.last_supervised = 0  # targets that are not -1 in the last batch
        self.lengths: list[int] = []
        self.items: list[tuple[list[int], list[int]]] = []  # (ids, mask), sorted by length
        if state is not None:
            self.load_state_dict(state)

    @property
    def stream_size(self) -> int:
        """Conversations in this stream per epoch."""
        return len(range(self.stream, len(self.task), self.num_streams))

    def _refill(self) -> None:
        while len(self.items) < self.buffer_size:
            if self.next_index >= len(self.task):
                self.next_index, self.epoch = self.stream, self.epoch + 1
            ids, mask = self.tokenizer.render_conversation(self.task[self.next_index], max_tokens=self.T + 1)
            self.next_index += self.num_streams
            i = bisect.bisect_left(self.lengths, len(ids))
            self.lengths.insert(i, len(ids))
            self.items.insert(i, (ids, mask))

    def _pack_row(self, row: torch.Tensor, keep: torch.Tensor) -> None:
        filled, capacity = 0, row.numel()
        while filled < capacity:
            self._refill()
            i = bisect.bisect_right(self.lengths, capacity - filled) - 1
            if i < 0:
                if filled == 0:  # cannot happen: render truncates to the row; guard anyway
                    i = 0
                else:
                    row[filled:] = self.pad
                    keep[filled:] = False
                    return
            ids, mask = self.items.pop(i)
            self.lengths.pop(i)
            ids, mask = ids[:capacity - filled], mask[:capacity - filled]
            row[filled:filled + len(ids)] = torch.tensor(ids)
            if self.mask_mode == "assistant":
                keep[filled:filled + len(ids)] = torch.tensor(mask, dtype=torch.bool)
            filled += len(ids)
            self.consumed += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty((self.B, self.T + 1), dtype=torch.long)
        keep = torch.ones((self.B, self.T + 1), dtype=torch.bool)
        for b in range(self.B):
            self._pack_row(rows[b], keep[b])
        targets = rows[:, 1:].masked_fill(~keep[:, 1:], -1)
        self.last_supervised = int((targets >= 0).sum())  # counted here, on the host: no device sync
        batch = to_device(torch.stack([rows[:, :-1], targets]), self.device)
        return batch[0], batch[1]

    def state_dict(self) -> dict:
        return {"stream": self.stream, "num_streams": self.num_streams, "next_index": self.next_index,
                "epoch": self.epoch, "consumed": self.consumed, "task_len": len(self.task),
                "items": [(list(ids), list(mask)) for ids, mask in self.items]}

    def load_state_dict(self, state: dict) -> None:
        from picochat.common import PicochatError
        if (state["stream"], state["num_streams"], state["task_len"]) != (self.stream, self.num_streams, len(self.task)):
            raise PicochatError("the saved data position is for another batch layout or mixture; resume "
                                "with the same batch sizes, number of processes and data")
        self.next_index, self.epoch, self.consumed = state["next_index"], state["epoch"], state["consumed"]
        self.items = [(list(ids), list(mask)) for ids, mask in state["items"]]
        self.lengths = [len(ids) for ids, _ in self.items]
