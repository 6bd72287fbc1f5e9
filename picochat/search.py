"""
Full-text search over a local SQLite FTS5 index: what the `search` tool reads (docs/TOOLS.md).

An index is one SQLite file, $PICOCHAT_HOME/index/NAME.sqlite, built once by
`picochat index build --dataset NAME` (picochat/stages/index.py) and only read afterwards:

- One FTS5 table, `pages(title, body)`, tokenized by unicode61 with accents folded and Porter
  stemming ("volcanoes" finds "volcano"), and a small `about` table: the format, what the index was
  built from, how many documents, when.
- It is built in a temporary file beside the final one and renamed into place, so a reader, or a
  crash, never meets half an index. Queries open it read-only (`mode=ro`). It lives under
  $PICOCHAT_HOME, which the Python tool's sandbox never mounts (tools.py, `_filesystem_args`).
- A query is its words, each one quoted and joined by OR, so what a user or a model types is never
  FTS5 syntax (no NEAR, no `*`, no `title:`, no unbalanced quote). Pages are ranked by BM25, which
  puts pages that match more of the words, and rarer ones, first; a word in the title counts
  TITLE_WEIGHT times a word in the text.
- A query stops after SEARCH_TIME_LIMIT_S (SQLite's progress handler), however large the index.

    build_index(index_path("mine"), [("Volcano", "A volcano is ..."), ...], source="my notes")
    hits = search(index_path("demo"), "capital of France", k=3)  # [Hit(title='France', text=...), ...]
    format_hits(hits, chars=500)                                 # 'France: France, officially ...'
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from picochat.common import PicochatError, atomic_path, picochat_home

INDEX_ENV = "PICOCHAT_SEARCH_INDEX"  # the index the search tool reads, by name
DEFAULT_INDEX = "demo"  # the demo's Wikipedia summaries
INDEX_FORMAT = "1"  # changes with the schema or the tokenizer; an index of another format is rebuilt
TOKENIZER = "porter unicode61 remove_diacritics 2"
# Of title weights 1, 3 and 10 on a few questions over the demo index, 3 put the page itself first
# for "capital of France" (France, not Fernand Braudel) and "who invented the telephone" (Bell,
# then Telephone) without crowding out pages that only mention the words in their titles.
TITLE_WEIGHT = 3.0
SEARCH_TIME_LIMIT_S = 1.0
MAX_QUERY_WORDS = 32  # the rest of a longer query is left out
NO_RESULTS = "No results."
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # fullmatch: a dataset name, never a path
BATCH_DOCS = 10_000  # documents per insert, and between progress reports


class Hit(NamedTuple):
    title: str
    text: str


def index_path(name: str) -> Path:
    """$PICOCHAT_HOME/index/NAME.sqlite, for an index named like a dataset."""
    if not isinstance(name, str) or not INDEX_NAME.fullmatch(name):
        raise PicochatError(f"index name {name!r} is not a dataset name: use up to 100 letters, digits, "
                            f"'_', '.' or '-', not starting with '.' or '-'")
    return picochat_home() / "index" / f"{name}.sqlite"


def default_index() -> str:
    """The name of the index the search tool reads: $PICOCHAT_SEARCH_INDEX, else the demo's."""
    return os.environ.get(INDEX_ENV) or DEFAULT_INDEX


def build_command(path: Path) -> str:
    return f"picochat index build --dataset {Path(path).stem}"


# -----------------------------------------------------------------------------
# Building

def build_index(path: Path, documents: Iterable[tuple[str, str]], source: str,
                progress: Callable[[int], None] | None = None) -> int:
    """Index (title, text) pairs into a new file at `path`, which replaces the index there only once
    it is complete. Documents without text are left out. `progress(count)` is called after every
    BATCH_DOCS documents. Returns the number of documents indexed."""
    path = Path(path)
    pages = ((title.strip(), text.strip()) for title, text in documents if text and text.strip())
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)  # a build killed earlier under this pid: start afresh
        db = sqlite3.connect(tmp)
        try:
            # No journal and no syncing while it is written: until the rename it is a scratch file,
            # and atomic_path fsyncs it before the rename.
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            try:
                db.execute(f"CREATE VIRTUAL TABLE pages USING fts5(title, body, tokenize = '{TOKENIZER}')")
            except sqlite3.OperationalError as e:
                raise PicochatError(f"this Python's SQLite {sqlite3.sqlite_version} cannot make the index ({e}); "
                                    f"the search tool needs SQLite 3.27 or later built with FTS5") from None
            db.execute("CREATE TABLE about (key TEXT PRIMARY KEY, value TEXT)")
            count = 0
            while batch := list(islice(pages, BATCH_DOCS)):
                db.executemany("INSERT INTO pages (title, body) VALUES (?, ?)", batch)
                count += len(batch)
                if progress is not None:
                    progress(count)
            if count == 0:
                raise PicochatError(f"{source} has no documents with text: nothing to index")
            db.execute("INSERT INTO pages (pages) VALUES ('optimize')")  # one b-tree per term: faster queries
            about = {"format": INDEX_FORMAT, "source": source, "documents": str(count),
                     "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            db.executemany("INSERT INTO about (key, value) VALUES (?, ?)", about.items())
            db.commit()
        finally:
            db.close()
    return count


def index_about(path: Path) -> dict[str, str] | None:
    """The `about` table of the index at `path`, or None when there is no readable index there."""
    if not Path(path).is_file():
        return None
    try:
        db = _open(Path(path))
        try:
            return dict(db.execute("SELECT key, value FROM about").fetchall())
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None


# -----------------------------------------------------------------------------
# Searching

def _open(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise PicochatError(f"no search index at {path}; build it with `{build_command(path)}`")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)  # as_uri escapes '?', '#', '%'


WORD = re.compile(r"\w+")


def _quoted(words: list[str], joiner: str) -> str:
    """Words as FTS5 strings: a quoted string is always a plain term, so OR, NEAR, `*`, `^`, `:`
    and quotes inside them mean nothing."""
    return joiner.join('"' + word.replace('"', '""') + '"' for word in words)


def match_expression(query: str) -> str:
    """The FTS5 query for what a person typed: its words, each a quoted string, joined by OR."""
    return _quoted(WORD.findall(query)[:MAX_QUERY_WORDS], " OR ")


def without_trailing_parentheses(text: str) -> str:
    """`text` without a '(...)' that ends it ('Mercury (planet)' -> 'Mercury'): the first '(' after
    the last ')' but the final one, in linear time (a regex takes quadratic time on '((((...')."""
    end = text.rstrip()
    if not end.endswith(")"):
        return text
    start = end.find("(", end.rfind(")", 0, len(end) - 1) + 1, len(end) - 1)
    return text if start < 0 else end[:start].rstrip()


def key_words(text: str) -> list[str]:
    """The words of a title or a query that the exact-title rule compares, as written: without a
    trailing '(...)' or a leading article."""
    words = WORD.findall(without_trailing_parentheses(text))
    return words[1:] if words and words[0].casefold() in ("a", "an", "the") else words


def joined_key(words: list[str]) -> str:
    return " ".join(words).casefold()


def title_key(text: str) -> str:
    """A title or a query as the exact-title rule compares them: its key words, case-folded (any
    script): 'The Beatles', 'the beatles?' and 'Beatles (band)' are all 'beatles'."""
    return joined_key(key_words(text))


def search(path: Path, query: str, k: int = 3, time_limit_s: float = SEARCH_TIME_LIMIT_S) -> list[Hit]:
    """The `k` best pages of the index at `path` for `query`, best first ([] when no page has any
    of its words): a page titled exactly as asked first ('China' finds China before History of
    China, which BM25 ranks higher for repeating the word; 'taxonomy' finds Taxonomy (biology), 'the
    beatles' The Beatles: `title_key`), then by BM25 with title words weighted.
    A missing or broken index, or a query past `time_limit_s`, is a PicochatError."""
    path = Path(path)
    match = match_expression(query)
    db = _open(path)
    deadline = time.monotonic() + time_limit_s
    db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)  # non-zero: SQLite stops the query
    try:
        if not match:
            return []
        # Pages titled as asked: of the few whose title holds every key word (FTS5 finds them), those
        # whose title_key is the query's, ranked by BM25 on the whole query; then the rest by BM25.
        # (Not found as exact: a title FTS5 folds otherwise than casefold, 'Straße' for 'strasse'.)
        words = key_words(query)
        key = joined_key(words)
        terms = [w for w in words if w.strip("_")][:MAX_QUERY_WORDS]  # '_' alone is no FTS5 term
        ids = [] if not terms else [
            rowid for rowid, title in db.execute("SELECT rowid, title FROM pages WHERE pages MATCH ?",
                                                 ("{title} : (" + _quoted(terms, " AND ") + ")",))
            if title_key(title) == key]
        select = f"SELECT title, body FROM pages WHERE pages MATCH ? {{}} ORDER BY bm25(pages, {TITLE_WEIGHT}, 1.0) LIMIT ?"
        exact = db.execute(select.format("AND rowid IN (SELECT value FROM json_each(?))"),
                           (match, json.dumps(ids), k)).fetchall() if ids else []
        best = db.execute(select.format(""), (match, k + len(exact))).fetchall()
        rows = exact + [row for row in best if row not in exact][:k - len(exact)]
    except sqlite3.DatabaseError as e:
        if time.monotonic() > deadline:
            raise PicochatError(f"the search took longer than {time_limit_s:g} s; try fewer or rarer words") from None
        raise PicochatError(f"{path} is not a search index this picochat can read ({e}); rebuild it with "
                            f"`{build_command(path)} --force`") from None
    finally:
        db.close()
    return [Hit(title, text) for title, text in rows]


def reference_search(path: Path, query: str, k: int = 3) -> list[Hit]:
    """What `search` returns, the slow obvious way: one query that orders every matching page by
    title_key(title) == the query's, called from SQLite for each of them (tests/test_search.py
    checks the two agree; benchmarks/search_speed.py times them)."""
    match = match_expression(query)
    if not match:
        return []
    db = _open(Path(path))
    db.create_function("title_key", 1, title_key, deterministic=True)
    try:
        rows = db.execute(f"SELECT title, body FROM pages WHERE pages MATCH ?1 ORDER BY title_key(title) = ?2 DESC, "
                          f"bm25(pages, {TITLE_WEIGHT}, 1.0) LIMIT ?3", (match, title_key(query), k)).fetchall()
    finally:
        db.close()
    return [Hit(title, text) for title, text in rows]


def _line(hit: Hit) -> str:
    """'Title: text' on one line, or the text alone where it already starts with the title."""
    title, text = " ".join(hit.title.split()), " ".join(hit.text.split())
    after = text[len(title):len(title) + 1]
    if not title or (text.startswith(title) and not (after.isalnum() or after == "_")):  # no word goes on
        return text
    return f"{title}: {text}"


def _cut(line: str, width: int) -> str:
    """`line`, or its head cut at a word and ended with '...', in at most `width` characters."""
    if len(line) <= width:
        return line
    head = line[:max(width - 3, 1)]
    if " " in head[width // 2:]:  # a word boundary late enough not to waste the room
        head = head[:head.rindex(" ")]
    return head.rstrip(" ,;:.") + "..."


def format_hits(hits: list[Hit], chars: int) -> str:
    """One line per hit, 'Title: its first sentences...', the lines sharing `chars` characters
    (newlines included) evenly; NO_RESULTS when there are none."""
    if not hits:
        return NO_RESULTS
    width = max((chars - (len(hits) - 1)) // len(hits), 8)
    return "\n".join(_cut(_line(hit), width) for hit in hits)
