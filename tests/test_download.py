"""
Downloads against a local HTTP server that misbehaves on purpose: drops connections mid-file,
answers 500, promises more bytes than it sends, serves a valid-looking prefix, ignores Range.
Both Hub datasets (FineWeb-Edu and ClimbMix) go through the same downloader, and the stages that
read shards find what it wrote.

    pytest -q tests/test_download.py
"""
from __future__ import annotations

import base64
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from picochat.__main__ import main
from picochat.common import PicochatError
from picochat.data.download import ByteProgress, download_file, download_shards
from picochat.data.loader import PackingLoader
from picochat.data.shards import check_shard, list_shards, write_shard
from picochat.tokenizer import Tokenizer, default_dataset

REPO_PATH = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
CLIMBMIX_PATH = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
# (dataset, the flags that choose it, its path on the Hub, its validation shard)
HUB = [("fineweb-edu", [], REPO_PATH, 1822), ("climbmix", ["--dataset", "climbmix"], CLIMBMIX_PATH, 6542)]


def make_shard_bytes(tmp_path: Path, seed: int) -> bytes:
    """A real shard of ~230 KB (random text barely compresses), several 64 KiB chunks long."""
    rng = random.Random(seed)
    docs = [base64.b64encode(rng.randbytes(1200)).decode() for _ in range(200)]
    path = tmp_path / f"fixture_{seed}.parquet"
    write_shard(path, docs, row_group_size=50)
    return path.read_bytes()


class FlakyServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 and records every request's headers.

    drop_first: that many responses promise the whole body, send half, and hang up.
    fail_first: that many responses are HTTP 500.
    truncate_at: every response stops after this many bytes of the file, whatever it promised.
    honour_range: answer Range requests with 206 (else always 200 with the whole file).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.drop_first = 0
        self.fail_first = 0
        self.truncate_at: int | None = None
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.seen.append((self.path, dict(self.headers)))
                if server.fail_first > 0:
                    server.fail_first -= 1
                    self.send_error(500, "flaky on purpose")
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                ranged = self.headers.get("Range")
                if ranged and server.honour_range:
                    start, status = int(ranged.removeprefix("bytes=").split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drop_first > 0:
                    server.drop_first -= 1
                    body = body[:len(body) // 2]
                if server.truncate_at is not None:
                    body = data[start:server.truncate_at]
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path / "home"


@pytest.fixture
def shard(tmp_path):
    return make_shard_bytes(tmp_path, seed=0)


@pytest.fixture
def server(shard):
    s = FlakyServer({"/shard.parquet": shard})
    yield s
    s.close()


def fetch(server, dest, **kwargs):
    return download_file(f"{server.url}/shard.parquet", dest, retries=5, backoff=0.001,
                         expected_check=check_shard, **kwargs)


# -----------------------------------------------------------------------------

def test_download_completes_byte_equal_and_leaves_no_partial(server, shard, tmp_path):
    dest = tmp_path / "out" / "shard.parquet"
    fetch(server, dest)
    assert dest.read_bytes() == shard
    assert not dest.with_name("shard.parquet.partial").exists()
    assert server.seen[0][1].get("Accept-Encoding") == "identity"


def test_resume_after_mid_file_drop_uses_range(server, shard, tmp_path):
    server.drop_first = 1
    dest = tmp_path / "shard.parquet"
    bar = ByteProgress("test")
    fetch(server, dest, bar=bar)
    assert bar.bar.n == bar.bar.total == len(shard)
    assert dest.read_bytes() == shard
    assert len(server.seen) == 2
    ranged = server.seen[1][1].get("Range")
    assert ranged is not None and ranged.startswith("bytes=")
    assert int(ranged.removeprefix("bytes=").rstrip("-")) > 0  # bytes from the first try were kept


def test_partial_left_by_an_earlier_run_is_resumed(server, shard, tmp_path):
    dest = tmp_path / "shard.parquet"
    dest.with_name("shard.parquet.partial").write_bytes(shard[:100_000])
    fetch(server, dest)
    assert dest.read_bytes() == shard
    assert server.seen[0][1].get("Range") == "bytes=100000-"


def test_server_that_ignores_range_restarts_from_zero(server, shard, tmp_path):
    server.drop_first, server.honour_range = 1, False
    dest = tmp_path / "shard.parquet"
    bar = ByteProgress("test")
    fetch(server, dest, bar=bar)
    assert dest.read_bytes() == shard
    assert "Range" in server.seen[1][1]  # we asked, the server answered 200 with everything
    assert bar.bar.n == bar.bar.total == len(shard)  # the restart took the dropped bytes back off


def test_server_errors_are_retried(server, shard, tmp_path):
    server.fail_first = 3
    dest = tmp_path / "shard.parquet"
    fetch(server, dest)
    assert dest.read_bytes() == shard
    assert len(server.seen) == 4


def test_permanently_truncated_source_fails_naming_url_and_leaves_nothing_final(server, shard, tmp_path):
    server.truncate_at = len(shard) // 3  # Content-Length promises more than ever arrives
    dest = tmp_path / "shard.parquet"
    with pytest.raises(PicochatError) as err:
        fetch(server, dest)
    assert f"{server.url}/shard.parquet" in str(err.value)
    assert "after 5 attempts: the connection dropped mid-file" in str(err.value)
    assert len(server.seen) == 5
    assert not dest.exists()
    # the bytes that did arrive (but the chunk cut off mid-read) stay for a later resume, under a
    # name no reader mistakes for a shard
    assert 0 < dest.with_name("shard.parquet.partial").stat().st_size <= len(shard) // 3


def test_valid_prefix_fails_integrity_check(shard, tmp_path):
    """The server serves a prefix as if it were the whole file: sizes agree, parquet does not."""
    server = FlakyServer({"/shard.parquet": shard[:len(shard) // 2]})
    try:
        dest = tmp_path / "shard.parquet"
        with pytest.raises(PicochatError) as err:
            fetch(server, dest)
        assert f"{server.url}/shard.parquet" in str(err.value)
        assert "integrity" in str(err.value)
        assert "\n" not in str(err.value)
        assert not dest.exists()
        assert not dest.with_name("shard.parquet.partial").exists()  # corrupt bytes are not resumed
    finally:
        server.close()


def test_missing_file_is_not_retried(server, tmp_path):
    dest = tmp_path / "nope.parquet"
    with pytest.raises(PicochatError, match="HTTP 404"):
        download_file(f"{server.url}/nope.parquet", dest, retries=5, backoff=0.001)
    assert len(server.seen) == 1
    assert not dest.exists()


def test_hf_endpoint_and_token_are_used(home, tmp_path, monkeypatch):
    val = make_shard_bytes(tmp_path, seed=1822)
    server = FlakyServer({f"/mirror{REPO_PATH}/shard_01822.parquet": val})
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url + "/mirror/")
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        download_shards(0, backoff=0.001)
        assert (home / "data" / "fineweb-edu" / "val_01822.parquet").read_bytes() == val
        assert [path for path, _ in server.seen] == [f"/mirror{REPO_PATH}/shard_01822.parquet"]
        assert server.seen[0][1]["Authorization"] == "Bearer hf_secret"
    finally:
        server.close()


@pytest.mark.parametrize("dataset, flags, repo_path, val", HUB, ids=[h[0] for h in HUB])
def test_cli_download_two_shards_and_the_val_shard(home, tmp_path, monkeypatch, capsys,
                                                   dataset, flags, repo_path, val):
    files = {f"{repo_path}/shard_{i:05d}.parquet": make_shard_bytes(tmp_path, seed=i) for i in (0, 1, val)}
    server = FlakyServer(files)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.drop_first = 1  # one of the three parallel downloads gets cut off and must resume
        assert main(["data", "download", "-n", "2", "-w", "3", *flags]) == 0
        root = home / "data" / dataset
        assert sorted(p.name for p in root.iterdir()) == [
            "shard_00000.parquet", "shard_00001.parquet", f"val_{val:05d}.parquet"]
        for i, name in [(0, "shard_00000"), (1, "shard_00001"), (val, f"val_{val:05d}")]:
            assert (root / f"{name}.parquet").read_bytes() == files[f"{repo_path}/shard_{i:05d}.parquet"]
        # A second run finds everything in place and asks the server for nothing.
        before = len(server.seen)
        assert main(["data", "download", "-n", "2", *flags]) == 0
        assert len(server.seen) == before
        assert "3 of 3 shards already" in capsys.readouterr().out
    finally:
        server.close()


@pytest.mark.parametrize("dataset, flags, repo_path, val", HUB, ids=[h[0] for h in HUB])
def test_cli_rejects_bad_shard_count_in_one_line(home, capsys, dataset, flags, repo_path, val):
    assert main(["data", "download", "-n", str(val + 1), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"between 0 and {val} for {dataset}" in err
    assert not (home / "data" / dataset).exists()


def test_unknown_dataset_is_a_one_line_error_listing_the_choices(home, capsys):
    with pytest.raises(SystemExit) as code:
        main(["data", "download", "-n", "1", "--dataset", "climbmax"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'climbmax'" in err and "'climbmix', 'fineweb-edu'" in err


# -----------------------------------------------------------------------------
# ClimbMix: nanochat's later pretraining set, through the same downloader

def test_climbmix_val_shard_is_fetched_even_with_no_train_shards(home, tmp_path, monkeypatch):
    val = make_shard_bytes(tmp_path, seed=6542)
    server = FlakyServer({f"{CLIMBMIX_PATH}/shard_06542.parquet": val})
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert main(["data", "download", "-n", "0", "--dataset", "climbmix"]) == 0
        assert [path for path, _ in server.seen] == [f"{CLIMBMIX_PATH}/shard_06542.parquet"]
        assert list_shards("climbmix", "val") == [home / "data" / "climbmix" / "val_06542.parquet"]
        assert list_shards("climbmix", "val")[0].read_bytes() == val
        with pytest.raises(PicochatError, match="no train shards .* data download --dataset climbmix -n 8"):
            list_shards("climbmix", "train")
    finally:
        server.close()


def test_climbmix_resumes_a_partial_shard_left_by_an_earlier_run(home, tmp_path, monkeypatch):
    files = {f"{CLIMBMIX_PATH}/shard_{i:05d}.parquet": make_shard_bytes(tmp_path, seed=i) for i in (0, 6542)}
    server = FlakyServer(files)
    root = home / "data" / "climbmix"
    root.mkdir(parents=True)
    (root / "shard_00000.parquet.partial").write_bytes(files[f"{CLIMBMIX_PATH}/shard_00000.parquet"][:70_000])
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert main(["data", "download", "-n", "1", "--dataset", "climbmix"]) == 0
        ranges = {path: headers.get("Range") for path, headers in server.seen}
        assert ranges == {f"{CLIMBMIX_PATH}/shard_00000.parquet": "bytes=70000-",
                          f"{CLIMBMIX_PATH}/shard_06542.parquet": None}
        assert (root / "shard_00000.parquet").read_bytes() == files[f"{CLIMBMIX_PATH}/shard_00000.parquet"]
        assert sorted(p.name for p in root.iterdir()) == ["shard_00000.parquet", "val_06542.parquet"]
    finally:
        server.close()


def test_climbmix_corrupt_shard_is_rejected_and_the_others_still_arrive(home, tmp_path, monkeypatch):
    """Shard 1 is served as a parquet prefix with a matching Content-Length: only decoding catches it."""
    files = {f"{CLIMBMIX_PATH}/shard_{i:05d}.parquet": make_shard_bytes(tmp_path, seed=i) for i in (0, 1, 6542)}
    bad = f"{CLIMBMIX_PATH}/shard_00001.parquet"
    files[bad] = files[bad][:len(files[bad]) // 2]
    server = FlakyServer(files)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(PicochatError) as err:
            download_shards(2, dataset="climbmix", retries=2, backoff=0.001)
        assert f"{server.url}{bad}" in str(err.value) and "integrity" in str(err.value)
        assert "\n" not in str(err.value)
        root = home / "data" / "climbmix"
        assert sorted(p.name for p in root.iterdir()) == ["shard_00000.parquet", "val_06542.parquet"]
        assert [p.name for p in list_shards("climbmix", "train")] == ["shard_00000.parquet"]
    finally:
        server.close()


def test_climbmix_val_shard_under_its_hub_name_is_never_trained_on(home, tmp_path):
    """nanochat keeps shard_06542.parquet as its val shard; copied over as is, it must not train."""
    root = home / "data" / "climbmix"
    root.mkdir(parents=True)
    for name in ("shard_00000.parquet", "shard_06542.parquet"):
        (root / name).write_bytes(make_shard_bytes(tmp_path, seed=0))
    with pytest.raises(PicochatError, match="shard_06542.parquet is climbmix's validation shard.*val_06542"):
        list_shards("climbmix", "train")


def test_tok_train_and_base_train_loader_read_downloaded_climbmix(home, tmp_path, monkeypatch):
    files = {f"{CLIMBMIX_PATH}/shard_{i:05d}.parquet": make_shard_bytes(tmp_path, seed=i) for i in (0, 1, 6542)}
    server = FlakyServer(files)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert main(["data", "download", "-n", "2", "--dataset", "climbmix"]) == 0
    finally:
        server.close()
    root = home / "data" / "climbmix"
    assert list_shards("climbmix", "train") == [root / "shard_00000.parquet", root / "shard_00001.parquet"]
    assert list_shards("climbmix", "val") == [root / "val_06542.parquet"]

    out = tmp_path / "tok"
    assert main(["tok_train", "--dataset", "climbmix", "--vocab-size", "300", "--max-chars", "50000",
                 "--output", str(out)]) == 0
    tokenizer = Tokenizer.load(out)
    assert default_dataset(tokenizer) == "climbmix"  # base_train's --dataset default
    # base_train reads through PackingLoader(dataset, split, ...): train and val from their own shards
    docs = {split: [d for p in list_shards("climbmix", split) for d in pq.read_table(p)["text"].to_pylist()]
            for split in ("train", "val")}
    for split, other in (("train", "val"), ("val", "train")):
        loader = PackingLoader("climbmix", split, tokenizer, batch_size=2, seq_len=64)
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (2, 64)
        assert inputs[0, 0].item() == tokenizer.bos_id
        text = tokenizer.decode(inputs[0, 1:].tolist())  # part of one document (each is ~1,600 chars)
        assert any(text in doc for doc in docs[split]) and not any(text in doc for doc in docs[other])
