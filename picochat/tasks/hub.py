"""
Dataset rows for tasks: a tiny stand-in for `datasets.load_dataset` over the Hugging Face Hub's
auto-generated parquet export, the choice between that and an offline source, and `RowTask`, the
Task over such rows (shuffled with seed 42, malformed rows skipped and counted).

The Hub converts every public dataset to parquet and lists the files of one subset and split at

    {HF_ENDPOINT or https://huggingface.co}/api/datasets/{repo}/parquet/{subset}/{split}

(a JSON list of URLs). HubDataset downloads each listed file once into
`$PICOCHAT_HOME/task_data/{repo}/{subset}/{split}/` with `download_file` (resumable, retried,
renamed into place only when whole), writes `files.json` last, and from then on reads the cache
without touching the network. A file lock keeps two processes (e.g. torchrun ranks) from
downloading the same files at once. `shuffle(seed)` gives rows in the order
`np.random.default_rng(seed).permutation(n)`, which is what `datasets.Dataset.shuffle(seed=...)`
does, so a task sees its rows in the same order nanochat does.

    ds = HubDataset("openai/gsm8k", "main", "test")
    len(ds); ds[0]["question"]; ds.shuffle(42)[0]
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from picochat.common import PicochatError, atomic_write_text, file_lock, picochat_home, print0
from picochat.data.download import download_file, hub_endpoint, hub_headers
from picochat.tasks.base import Task

SOURCES = ("auto", "hub", "offline")
SHUFFLE_SEED = 42          # nanochat shuffles every task dataset with seed 42 (docs/DESIGN.md#tasks)
LIST_TIMEOUT = (10, 30)    # seconds to connect, seconds to wait for the file listing
LIST_ATTEMPTS = 3          # listing retries on timeouts and 5xx answers (1 s, 2 s apart)
MANIFEST = "files.json"    # written after every file of a split is in place


class HubUnreachable(PicochatError):
    """The Hub could not be reached at all (no connection, timeouts, server errors). Tasks with
    source='auto' fall back to their offline source on this error and on no other."""


# Endpoints that already failed in this process, with the reason: the next task asking skips
# the network instead of waiting out the same timeouts again.
_unreachable: dict[str, str] = {}


# -----------------------------------------------------------------------------
# Rows

def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The row order of `datasets.Dataset.shuffle(seed=seed)` on n rows."""
    return np.random.default_rng(seed).permutation(n)


class Rows:
    """Rows of a pyarrow table, optionally in a chosen order: len, row dicts, shuffle."""

    def __init__(self, table: pa.Table, order: np.ndarray | None = None):
        self.table = table
        self.order = order

    def __len__(self) -> int:
        return self.table.num_rows if self.order is None else len(self.order)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i = i % len(self)
        j = i if self.order is None else int(self.order[i])
        return self.table.slice(j, 1).to_pylist()[0]

    def __iter__(self):
        if self.order is not None:
            return (self[i] for i in range(len(self)))
        return (row for batch in self.table.to_batches(max_chunksize=4096) for row in batch.to_pylist())

    def shuffle(self, seed: int) -> "Rows":
        """A view in `datasets.Dataset.shuffle(seed)` order (a shuffled view shuffles its order)."""
        perm = shuffle_order(len(self), seed)
        view = copy.copy(self)
        view.order = perm if self.order is None else self.order[perm]
        return view


# -----------------------------------------------------------------------------
# The Hub's parquet export

def task_data_dir(repo: str, subset: str, split: str) -> Path:
    return picochat_home() / "task_data" / repo / subset / split


def list_parquet_urls(repo: str, subset: str, split: str, offline_hint: str = "") -> list[str]:
    """The parquet URLs the Hub lists for one subset and split. Raises HubUnreachable when the Hub
    can't be reached (with `offline_hint` appended), PicochatError for any other refusal."""
    endpoint = hub_endpoint()
    url = f"{endpoint}/api/datasets/{repo}/parquet/{subset}/{split}"
    hint = f"; {offline_hint}" if offline_hint else ""
    if endpoint in _unreachable:
        raise HubUnreachable(f"could not reach the Hugging Face Hub at {endpoint} "
                             f"({_unreachable[endpoint]}) to list {repo} {subset}/{split}{hint}")
    reason = "no attempt made"
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            r = requests.get(url, headers=hub_headers(), timeout=LIST_TIMEOUT)
        except requests.exceptions.Timeout:
            reason = f"no answer in {LIST_TIMEOUT[1]} s"
        except requests.exceptions.ConnectionError as e:
            # Unknown host or refused connection: a few seconds of waiting will not change that.
            reason = _connection_reason(e)
            break
        else:
            if r.status_code in (401, 403):
                raise PicochatError(f"the Hub refused to list {repo} {subset}/{split} (HTTP "
                                    f"{r.status_code}); if the dataset is gated or private, set "
                                    f"HF_TOKEN to a Hugging Face token that may read it")
            if r.status_code == 404:
                raise PicochatError(f"the Hub has no parquet export of {repo} subset {subset!r} "
                                    f"split {split!r} (HTTP 404 from {url}); check the names")
            if r.status_code < 400:
                return _parse_listing(r, url)
            reason = f"HTTP {r.status_code}"
        if attempt < LIST_ATTEMPTS:
            time.sleep(attempt)
    _unreachable[endpoint] = reason
    raise HubUnreachable(f"could not reach the Hugging Face Hub at {endpoint} ({reason}) to list "
                         f"{repo} {subset}/{split}{hint}")


def _connection_reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Name or service not known", "Connection refused", "Network is unreachable",
                   "Temporary failure in name resolution", "No route to host"):
        if marker in text:
            return marker.lower()
    return "cannot connect"


def _parse_listing(r: requests.Response, url: str) -> list[str]:
    try:
        urls = r.json()
    except ValueError:
        urls = None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise PicochatError(f"unexpected answer from {url}: wanted a non-empty JSON list of parquet "
                            f"URLs, got {r.text[:200]!r}")
    return urls


def _check_parquet(path: Path) -> None:
    pq.read_metadata(path)  # raises on a truncated or non-parquet file (the footer is at the end)


def fetch_parquet_files(repo: str, subset: str, split: str, offline_hint: str = "") -> list[Path]:
    """The split's parquet files on disk, downloading those not yet cached (once, under a lock)."""
    root = task_data_dir(repo, subset, split)
    cached = _read_manifest(root)
    if cached is not None:
        return cached
    with file_lock(root / ".lock"):
        cached = _read_manifest(root)  # another process may have finished while we waited
        if cached is not None:
            return cached
        urls = list_parquet_urls(repo, subset, split, offline_hint)
        print0(f"{repo} {subset}/{split}: downloading {len(urls)} parquet file"
               f"{'s' * (len(urls) != 1)} into {root}")
        names = [f"{i:04d}.parquet" for i in range(len(urls))]  # listing order is row order
        for url, name in zip(urls, names):
            try:
                download_file(url, root / name, headers=hub_headers(), expected_check=_check_parquet)
            except PicochatError as e:
                # Listed but not downloadable (often a blocked CDN host the Hub redirects to): the
                # Hub is as good as unreachable, so 'auto' may still fall back to offline data.
                raise HubUnreachable(f"{e}{f'; {offline_hint}' if offline_hint else ''}") from None
        atomic_write_text(root / MANIFEST, json.dumps({"repo": repo, "subset": subset, "split": split,
                                                       "files": names, "urls": urls}, indent=1) + "\n")
    return [root / name for name in names]


def _read_manifest(root: Path) -> list[Path] | None:
    try:
        files = [root / name for name in json.loads((root / MANIFEST).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if all(f.exists() for f in files) else None


class HubDataset(Rows):
    """One subset and split of a Hub dataset, read from its parquet export (module docstring)."""

    def __init__(self, repo: str, subset: str = "default", split: str = "train",
                 offline_hint: str = ""):
        self.repo, self.subset, self.split = repo, subset, split
        files = fetch_parquet_files(repo, subset, split, offline_hint)
        try:
            tables = [pq.read_table(f) for f in files]
            table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        except (pa.ArrowException, OSError) as e:
            raise PicochatError(f"cannot read the cached parquet files of {repo} {subset}/{split} "
                                f"in {files[0].parent} ({e}); delete that folder to download "
                                f"them again") from None
        super().__init__(table)


# -----------------------------------------------------------------------------
# Choosing a source, and the Task over rows

def open_rows(name: str, repo: str, subset: str, split: str, source: str,
              offline: Callable[[], Rows] | None = None, offline_note: str = "") -> tuple[Rows, str]:
    """The rows of `name` (a task's name, for messages) and which source gave them.

    source 'hub' reads the Hub export, 'offline' calls `offline()` (None: this split has no offline
    source; `offline_note` says what the offline source covers), 'auto' reads the Hub and falls
    back to the offline source only when the Hub can't be reached."""
    if source not in SOURCES:
        raise PicochatError(f"{name}: source must be one of {', '.join(SOURCES)}, got {source!r}")
    if offline is not None:
        hint = f"use source='offline' for {name} {split} ({offline_note})"
    else:
        hint = (f"{name} {split} has no offline source{f' ({offline_note})' if offline_note else ''}; "
                f"set HF_ENDPOINT to a reachable mirror, or run once where the Hub is reachable "
                f"(the files are then cached in {task_data_dir(repo, subset, split)})")
    if source == "offline":
        if offline is None:
            raise PicochatError(f"{name} {split} has no offline source"
                                f"{f' ({offline_note})' if offline_note else ''}; use source='hub'")
        return offline(), "offline"
    try:
        return HubDataset(repo, subset, split, offline_hint=hint), "hub"
    except HubUnreachable as e:
        if source == "hub" or offline is None:
            raise
        print0(f"{name} {split}: {str(e).split(';')[0]}; using the offline source ({offline_note})")
        return offline(), "offline"


class RowTask(Task):
    """A Task whose examples are dataset rows turned into conversations by `convert(row)`.

    Rows come in the seed-42 shuffled order nanochat uses. `convert` returns None for a malformed
    row (a KeyError, TypeError, ValueError or IndexError counts as None too); such rows are left
    out, and their number is in `.skipped`. Every row is checked once, when the task is built."""

    def __init__(self, rows: Rows, source: str, seed: int | None = SHUFFLE_SEED, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.source = rows, source
        valid = self.valid_rows(rows)
        order = np.arange(len(rows)) if seed is None else shuffle_order(len(rows), seed)
        self.order = order[valid[order]]
        self.skipped = int(len(rows) - valid.sum())
        if self.skipped:
            print0(f"{type(self).__name__}: skipped {self.skipped:,} malformed of {len(rows):,} rows")

    def convert(self, row: dict) -> dict | None:
        raise NotImplementedError

    def _safe_convert(self, row) -> dict | None:
        try:
            return self.convert(row) if isinstance(row, dict) else None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return None

    def valid_rows(self, rows: Rows) -> np.ndarray:
        """A boolean per row in stored order: does it make a conversation?"""
        return np.fromiter((self._safe_convert(row) is not None for row in rows), dtype=bool,
                           count=len(rows))

    def num_examples(self) -> int:
        return len(self.order)

    def get_example(self, index: int) -> dict:
        return self.convert(self.rows[int(self.order[index])])
