"""
Tests for picochat/search.py and `picochat index`: a tiny index built in a temporary home finds the
page a question is about, ranks by BM25, treats every query as plain words, keeps its answers within
the tool's bound, says in one line how to build a missing index, and is only ever read; the
`picochat index build` / `index search` commands end to end on a tiny dataset.
Run:  python -m pytest tests/test_search.py  (about a second; one sandbox call where bwrap works)
"""
import shutil
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.__main__ import main as picochat_main
from picochat.common import PicochatError, data_dir
from picochat.data.shards import write_shard
from picochat.search import (INDEX_ENV, NO_RESULTS, Hit, _open, build_index, format_hits, index_path,
                             match_expression, reference_search, search)
from picochat.toolbox import TOOL_OUTPUT_CHARS, run_tool

PAGES = [
    ("Volcano", "A volcano is a rupture in the crust of a planet through which lava, ash and gases escape."),
    ("Mauna Loa", "Mauna Loa is one of five volcanoes that form the island of Hawaii."),
    ("France", "France is a country in Western Europe. Its capital is Paris."),
    ("Paris", "Paris is the largest city of France, on the river Seine."),
    ("Strawberry", "The garden strawberry is a widely grown hybrid plant cultivated for its fruit."),
    ("Telephone", "A telephone lets two or more users talk when they are too far apart to be heard."),
]


@pytest.fixture
def tiny_index(home, monkeypatch):
    """The index 'tiny' of PAGES in a temporary home, and the search tool pointed at it."""
    path = index_path("tiny")
    assert build_index(path, PAGES, source="the test's pages") == len(PAGES)
    monkeypatch.setenv(INDEX_ENV, "tiny")
    return path


def titles(hits):
    return [hit.title for hit in hits]


def test_the_search_tool_answers_with_the_page_the_words_are_about(tiny_index):
    answer = run_tool('search("volcano")')
    assert answer.splitlines()[0] == "Volcano: " + PAGES[0][1]
    assert answer.splitlines()[1].startswith("Mauna Loa is one of five volcanoes")  # stemmed; no title repeat
    assert run_tool("search('strawberry')") == "Strawberry: " + PAGES[4][1]


def test_a_page_titled_as_asked_comes_first(home):
    """BM25 favours a page that repeats the word; a person asking about China means China."""
    path = index_path("countries")
    build_index(path, [("History of China", "China's history: China, China and China again."),
                       ("China", "China is a country in East Asia."),
                       ("Taxonomy (biology)", "Taxonomy is the science of naming organisms."),
                       ("Domain (taxonomy)", "A domain is the highest taxonomic rank; taxonomy, taxonomy."),
                       ("History of the Beatles", "The Beatles, the Beatles and the Beatles again."),
                       ("The Beatles", "The Beatles were a rock band."),
                       ("History of Ørsted", "Ørsted, Ørsted, Ørsted."), ("Ørsted", "Ørsted is a company.")],
                source="countries")
    assert [hit.title for hit in search(path, "the China?")][:2] == ["China", "History of China"]
    assert search(path, "taxonomy")[0].title == "Taxonomy (biology)"
    assert search(path, "the Beatles")[0].title == "The Beatles" and search(path, "beatles")[0].title == "The Beatles"
    assert search(path, "ørsted")[0].title == "Ørsted"  # case-folded in any script


def test_search_agrees_with_the_one_query_reference(home):
    """The fast exact-title path (FTS5 finds the candidates) returns what the obvious one does
    (SQLite calls title_key on every matching page), on titles that share words, articles,
    parentheses and case."""
    path = index_path("lookalikes")
    stems = ["Mercury", "The Mercury", "Mercury (planet)", "Mercury (element)", "History of Mercury", "Mercury Records",
             "Red Planet", "A Planet", "Planet (band)", "the planet", "Ørsted", "ØRSTED (company)", "Foo _", "Foo (a (b)"]
    pages = [(t, f"{t} is a page about {t.lower()} and {stems[(i * 7) % len(stems)]}.") for i, t in enumerate(stems)]
    pages += [("Foo fighters", "Foo fighters: foo, foo and foo again."), ("Mercury in history", "Mercury, mercury, mercury.")]
    build_index(path, pages, source="look-alikes")
    queries = [t for t, _ in pages] + ["mercury", "the mercury?", "What is Mercury?", "planet", "a planet (x)",
                                       "ørsted", "foo _", "_", "the", "Mercury (band)", "x (y(z)", "((((", "records of mercury"]
    for query in queries:
        for k in (1, 3, 5):
            assert search(path, query, k=k) == reference_search(path, query, k=k), (query, k)


def test_bm25_puts_more_and_rarer_words_and_title_matches_first(tiny_index):
    assert titles(search(tiny_index, "capital of France")) == ["France", "Paris", "Mauna Loa"]  # "of" alone last
    assert titles(search(tiny_index, "Paris"))[0] == "Paris"  # in the title and the text, above France's mention
    assert titles(search(tiny_index, "volcanoes", k=1)) == ["Volcano"]
    assert search(tiny_index, "zeppelin") == [] and run_tool('search("zeppelin")') == NO_RESULTS


@pytest.mark.parametrize("query", ['a" OR "b', "NEAR(", "*", "volcano*", "title:volcano", '"', "(", ")",
                                   "NOT volcano", "AND", "^volcano", "volcano + -", "{title}: x", "", "   ",
                                   "x" * 5000, "word " * 500, '"); DROP TABLE pages; --', "volcano\x00",
                                   "\x00", "volcano " * 200_000])
def test_fts_syntax_in_a_query_is_only_words(query, tiny_index):
    before = tiny_index.read_bytes()
    hits = search(tiny_index, query)
    assert all(isinstance(hit, Hit) for hit in hits)
    answer = run_tool(f"search({query!r})")
    assert isinstance(answer, str) and not answer.startswith("Error") and len(answer) <= TOOL_OUTPUT_CHARS
    if "volcano" in query:
        assert titles(hits)[0] == "Volcano"
    assert tiny_index.read_bytes() == before  # (the 1.4 MB query and the DROP TABLE too)


def test_match_expression_quotes_every_word():
    assert match_expression('a" OR "b') == '"a" OR "OR" OR "b"'
    assert match_expression("NEAR(x y, 2) *") == '"NEAR" OR "x" OR "y" OR "2"'
    assert match_expression("*") == ""


def test_answers_fit_the_tool_bound_and_are_cut_at_a_word(home, monkeypatch):
    long_pages = [(f"Lava {i}", "lava flows " * 5000) for i in range(4)]
    build_index(index_path("long"), long_pages, source="long pages")
    monkeypatch.setenv(INDEX_ENV, "long")
    answer = run_tool('search("lava")')
    lines = answer.splitlines()
    assert len(answer) <= TOOL_OUTPUT_CHARS and len(lines) == 3
    assert all(line.startswith("Lava ") and line.endswith("flows...") for line in lines)
    assert format_hits([Hit("T", "one two three four five six")], chars=16) == "T: one two..."


def test_a_missing_index_is_one_line_naming_the_command_that_builds_it(home, monkeypatch):
    monkeypatch.setenv(INDEX_ENV, "nowhere")
    expected = (f"no search index at {index_path('nowhere')}; build it with "
                f"`picochat index build --dataset nowhere`")
    assert run_tool('search("volcano")') == f"Error: {expected}"
    with pytest.raises(PicochatError) as missing:
        search(index_path("nowhere"), "volcano")
    assert str(missing.value) == expected


def test_a_file_that_is_no_index_says_to_rebuild_it(home):
    path = index_path("junk")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(PicochatError, match="--dataset junk --force"):
        search(path, "volcano")


def test_the_index_is_opened_read_only(tiny_index):
    before = tiny_index.read_bytes()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        _open(tiny_index).execute("INSERT INTO pages (title, body) VALUES ('x', 'y')")
    assert titles(search(tiny_index, "volcano"))[0] == "Volcano" and tiny_index.read_bytes() == before


def test_a_query_past_its_time_limit_stops_with_an_error(home):
    # SQLite checks the deadline every 1,000 of its instructions: enough matching pages to reach one
    path = index_path("many")
    build_index(path, [(f"Page {i}", "lava and ash") for i in range(2000)], source="many pages")
    assert len(search(path, "lava", k=5)) == 5
    with pytest.raises(PicochatError, match="took longer than"):
        search(path, "lava", time_limit_s=-1)


def test_a_rebuild_replaces_the_index_whole(tiny_index):
    build_index(tiny_index, [("Zeppelin", "A zeppelin is a rigid airship.")], source="other pages")
    assert search(tiny_index, "volcano") == [] and titles(search(tiny_index, "airship")) == ["Zeppelin"]
    assert [p.name for p in tiny_index.parent.iterdir()] == ["tiny.sqlite"]  # no temporary file left
    with pytest.raises(PicochatError, match="no documents"):
        build_index(tiny_index, [("Empty", "  ")], source="empty pages")
    assert titles(search(tiny_index, "airship")) == ["Zeppelin"]  # a failed build leaves the old index


def test_the_python_sandbox_cannot_write_the_index(tiny_index):
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed: apt-get install bubblewrap")
    from picochat.tools import run_python
    before = tiny_index.read_bytes()
    try:
        result = run_python(f"import os\nprint(os.path.exists({str(tiny_index)!r}))\n"
                            f"open({str(tiny_index)!r}, 'a').write('x')")
    except PicochatError as e:  # a sandbox layer this machine lacks
        pytest.skip(str(e))
    assert result.stdout == "False\n" and not result.success  # $PICOCHAT_HOME is not in the jail at all
    assert tiny_index.read_bytes() == before


def test_index_build_and_search_end_to_end_on_a_tiny_dataset(home, capsys):
    # an imported corpus: no titles, so a page is named by its first words
    write_shard(data_dir("notes") / "shard_00000.parquet", [text for _, text in PAGES[:4]])
    write_shard(data_dir("notes") / "val_00000.parquet", [PAGES[4][1]])
    assert picochat_main(["index", "build", "--dataset", "notes"]) == 0
    assert "indexed 5 documents" in capsys.readouterr().out
    assert picochat_main(["index", "build", "--dataset", "notes"]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert picochat_main(["index", "search", "--index", "notes", "-k", "2", "capital", "of", "France"]) == 0
    assert capsys.readouterr().out.splitlines() == [PAGES[2][1], PAGES[3][1]]
    assert picochat_main(["index", "search", "--index", "notes", "strawberry"]) == 0  # the val split too
    assert capsys.readouterr().out.strip() == PAGES[4][1]

    # a shard with a title column: the titles are kept
    table = pa.table({"text": [text for _, text in PAGES], "title": [title for title, _ in PAGES]})
    pq.write_table(table, data_dir("notes") / "shard_00000.parquet")
    assert picochat_main(["index", "build", "--dataset", "notes"]) == 0  # the shards changed: rebuilt
    capsys.readouterr()
    assert picochat_main(["index", "search", "--index", "notes", "-k", "1", "telephone"]) == 0
    assert capsys.readouterr().out.strip() == "Telephone: " + PAGES[5][1]

    assert picochat_main(["index", "search", "--index", "absent", "volcano"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "`picochat index build --dataset absent`" in error
