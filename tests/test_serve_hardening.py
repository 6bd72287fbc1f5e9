"""
Tests for `picochat serve` under attack: malformed and oversized bodies, slow and idle clients,
clients that hang up mid-body, and the ways to give the API key (docs/SECURITY.md#the-server).

Everything talks to loopback only. Most tests run the app in this process (uvicorn in a thread,
with the limits of picochat.serve.app.serve_config, short timeouts); the ones marked slow start
real `picochat serve` processes (log, memory and file-descriptor checks). Every loop is bounded in
count and in time.

    pytest -q tests/test_serve_hardening.py
"""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from picochat.__main__ import main as picochat_main
from picochat.engine import Engine
from picochat.scheduler import EnginePool, Scheduler
from picochat.serve.api import Defaults
from picochat.serve.app import create_app, serve_config
from serve_fixtures import TINY_TAG, free_port, load_tiny_chat_model, stop_process
from stagerun import env_for

GREEDY = Defaults(temperature=0.0, top_k=50, max_tokens=64)
CHAT = "/v1/chat/completions"
MB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tiny_home):
    """(model, tokenizer) of the tiny SFT checkpoint, fp32 on the CPU."""
    return load_tiny_chat_model(tiny_home)


@contextlib.contextmanager
def hardened(model, tok, *, api_key=None, header_timeout=2.0, body_timeout=2.0, max_connections=1000,
             **limits):
    """The app in this process under serve_config (picochat serve's uvicorn settings), with short
    timeouts; yields (host, port). `limits`: serve_config's other keywords."""
    import uvicorn
    pool = EnginePool([Scheduler(Engine(model, tok), 2, 8)])
    app = create_app(pool, tok, "tiny", model.config.sequence_len, GREEDY, api_key, body_timeout=body_timeout)
    config = serve_config(app, "127.0.0.1", free_port(), max_connections=max_connections,
                          header_timeout=header_timeout, log_level="warning", **limits)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", config.port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are; (status, whole reply) of what comes back before the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        return read_reply(s)


def read_reply(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    with contextlib.suppress(ConnectionResetError, socket.timeout):
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b"connection: close" not in data.lower():
                head, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    assert data.startswith(b"HTTP/1.1 "), f"no HTTP reply: {data[:200]!r}"
    return int(data[9:12]), data


def post_head(port: int, extra: str = "", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{framing}{extra}\r\n").encode()


# -----------------------------------------------------------------------------
# Malformed bodies: a 400 naming the problem, never a 500


HI = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'


@pytest.mark.parametrize("body, words", [
    (HI + b', "seed": ' + b"9" * 5000 + b"}", "integer of 5,000 digits; the limit is 64"),
    (HI + b', "max_tokens": ' + b"9" * 4000 + b"}", "integer of 4,000 digits"),
    (b"[" * 100_000, "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' * 65 + b"1" + b"}" * 65, "nested more than 64 levels"),
    (HI[:-1] + b'"\xff\xfe"}', "not valid UTF-8 (byte"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte-order mark
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'"hello"', "must be a JSON object, got str"),
    (b"null", "must be a JSON object, got NoneType"),
    (b"", "not valid JSON"),
    (HI + b', "max_tokens": 99999999999999999999}', "max_tokens must be in [1, 4096]"),
    (HI + b', "stop": [' + b'["x"], ' * 5000 + b'"y"]}', "stop must be"),
])
def test_a_malformed_body_is_a_400_naming_the_problem(tiny, body, words):
    model, tok = tiny
    with hardened(model, tok) as (host, port), httpx.Client(timeout=30) as client:
        url = f"http://{host}:{port}"
        r = client.post(url + CHAT, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert words in error["message"] and len(error["message"]) < 400
        ok = client.post(url + CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200


def test_a_lone_surrogate_in_a_message_is_served_or_refused_but_never_a_500(tiny):
    model, tok = tiny
    with hardened(model, tok) as (host, port), httpx.Client(timeout=30) as client:
        r = client.post(f"http://{host}:{port}{CHAT}", content=HI[:-16] + b'"\\ud800 hi"}], "max_tokens": 2}',
                        headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), r.text[:300]


# -----------------------------------------------------------------------------
# Oversized bodies: refused before (or as soon as) they pass 1 MB


def test_a_content_length_of_1_tb_is_a_413_at_once_without_sending_the_body(tiny):
    model, tok = tiny
    with hardened(model, tok) as (_, port):
        start = time.monotonic()
        status, reply = raw_request(port, post_head(port, length=10 ** 12), timeout=5)
        assert status == 413 and b"1,000,000,000,000 bytes" in reply and b"connection: close" in reply.lower()
        assert time.monotonic() - start < 2


def send_chunked(port: int, total: int, piece: int = 64 * 1024) -> tuple[int, bytes, int]:
    """POST `total` bytes in chunks of `piece` until the server stops reading; (status, reply, sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(post_head(port))
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (piece, b" " * piece))
                sent += piece
            s.sendall(b"0\r\n\r\n")
        return *read_reply(s), sent


def test_a_chunked_body_over_1_mb_is_a_413_and_the_rest_is_not_read(tiny):
    model, tok = tiny
    with hardened(model, tok) as (host, port):
        status, reply, sent = send_chunked(port, 20 * MB)
        assert status == 413 and b"over 1,048,576 bytes" in reply
        assert sent < 8 * MB  # the server closed the connection soon after the limit
        assert httpx.get(f"http://{host}:{port}/health", timeout=5).status_code == 200


def test_an_unauthenticated_body_is_refused_before_it_is_read(tiny):
    model, tok = tiny
    with hardened(model, tok, api_key="sekret") as (_, port):
        status, reply = raw_request(port, post_head(port, length=900_000), timeout=5)  # no body sent
        assert status == 401 and b"missing API key" in reply


# -----------------------------------------------------------------------------
# Framing and headers (RFC 9112)


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(tiny):
    """Both framings in one request: a proxy in front may have used the other one, and the bytes
    after the body it saw would be a second, smuggled request. The server used to answer and read
    on; now it answers 400 and closes, so nothing after the first request is ever read."""
    model, tok = tiny
    with hardened(model, tok) as (_, port):
        smuggled = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        status, reply = raw_request(port, post_head(port, "Content-Length: 5\r\n") + b"0\r\n\r\n" + smuggled)
        assert status == 400 and b"both Content-Length and Transfer-Encoding" in reply
        assert b"connection: close" in reply.lower() and reply.count(b"HTTP/1.1 ") == 1, reply


@pytest.mark.parametrize("writes", [[100_000], [10_000, 10_000]], ids=["one write", "two writes"])
def test_request_headers_over_16_kb_are_a_431_however_they_are_sent(tiny, writes):
    """h11 limits only a header block still incomplete: 100 KB in one write, or two writes of 10 KB
    each, used to be served."""
    model, tok = tiny
    with hardened(model, tok) as (host, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
            for i, size in enumerate(writes):  # the last write ends the block: h11 never sees it incomplete
                end = b"\r\n" if i == len(writes) - 1 else b""
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall((head if i == 0 else b"") + f"X-Filler-{i}: {'a' * size}\r\n".encode() + end)
                time.sleep(0.2)  # separate reads on the server's side
            status, reply = read_reply(s)
        assert status == 431, reply[:300]
        assert b"over 16,384 bytes" in reply and b"connection: close" in reply.lower()
        ok = httpx.get(f"http://{host}:{port}/health", headers={"X-Fine": "a" * 15_000}, timeout=5)
        assert ok.status_code == 200  # just under the limit still passes


def test_one_client_cannot_hold_every_connection(tiny):
    """One address opens more idle connections than the server takes in all (the attack held 1,100
    of 1,000, and 22 of 30 /health calls from elsewhere failed); it gets only its share, and
    another address is served every time."""
    model, tok = tiny
    with hardened(model, tok, header_timeout=30.0, max_connections=40, max_client_connections=10) as (_, port):
        held, refused = [], 0
        try:
            for _ in range(50):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(s)
            time.sleep(0.3)
            for s in held[10:]:  # past its 10: a 503 that says why, then closed
                status, reply = read_reply(s)
                refused += status == 503 and b"the most one client may hold" in reply
            assert refused == 40
            other = httpx.HTTPTransport(local_address="127.0.0.2")  # another client (all of 127/8 is loopback)
            with httpx.Client(transport=other, timeout=5) as client:
                for _ in range(30):
                    assert client.get(f"http://127.0.0.1:{port}/health", headers={"Connection": "close"}).status_code == 200
        finally:
            for s in held:
                s.close()


# -----------------------------------------------------------------------------
# Slow clients: cut off in a stated time


def dribble(port: int, first: bytes, limit_s: float) -> tuple[int | None, float]:
    """Send `first`, then a byte a second until the server answers or closes (at most limit_s);
    (status or None if it closed without a reply, seconds until then)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(first)
        s.settimeout(1.0)
        while time.monotonic() - start < limit_s:
            try:
                data = s.recv(65536)
            except socket.timeout:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b"x")
                continue
            except ConnectionResetError:
                return None, time.monotonic() - start
            if not data:
                return None, time.monotonic() - start
            return int(data[9:12]), time.monotonic() - start
    raise AssertionError(f"still connected after {limit_s} s")


def test_a_client_sending_headers_a_byte_a_second_gets_a_408_within_the_header_timeout(tiny):
    model, tok = tiny
    with hardened(model, tok, header_timeout=2.0) as (_, port):
        status, seconds = dribble(port, f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode(), 10)
        assert status == 408 and 1.9 < seconds < 4


def test_a_client_sending_its_body_a_byte_a_second_gets_a_408_within_the_body_timeout(tiny):
    model, tok = tiny
    with hardened(model, tok, body_timeout=2.0) as (_, port):
        status, seconds = dribble(port, post_head(port, length=500_000) + b"{", 10)  # a Content-Length it will never fill
        assert status == 408 and 1.9 < seconds < 4


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(tiny):
    model, tok = tiny
    with hardened(model, tok, header_timeout=1.0) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            start = time.monotonic()
            assert s.recv(100) == b""  # closed, no reply: nothing was asked
            assert 0.9 < time.monotonic() - start < 3


def test_a_keep_alive_connection_cannot_dribble_its_next_request(tiny):
    model, tok = tiny
    with hardened(model, tok, header_timeout=2.0) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert read_reply(s)[0] == 200
            start = time.monotonic()
            s.settimeout(1.0)
            status = None
            while time.monotonic() - start < 10 and status is None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b"G")  # stops uvicorn's keep-alive timer each time
                with contextlib.suppress(socket.timeout):
                    data = s.recv(65536)
                    status = int(data[9:12]) if data else 0
            assert status in (408, 0) and time.monotonic() - start < 4


# -----------------------------------------------------------------------------
# Real `picochat serve` processes: logs, memory, file descriptors, the API key


@contextlib.contextmanager
def serve_process(home: Path, *args: str, env: dict | None = None, nofile: int | None = None,
                  timeout: float = 120.0):
    """`picochat serve` on a free port (its output in a log file); yields (port, process, log path).
    `nofile`: the open-files limit (soft and hard) the process starts with."""
    port = free_port()
    log = Path(home) / f"hardening_{port}.log"
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    cmd = [sys.executable, "-m", "picochat", "serve", "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--model-tag", TINY_TAG, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env_for(Path(home)) | (env or {}), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"picochat serve exited with {proc.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"not healthy after {timeout} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield port, proc, log
    finally:
        stop_process(proc)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.fixture(scope="module")
def server(tiny_home, tiny):
    """One `picochat serve` for the tests below, its key in $PICOCHAT_API_KEY, a long header
    timeout (idle connections stay while the test holds them)."""
    with serve_process(tiny_home, "--header-timeout", "60",
                       env={"PICOCHAT_API_KEY": "env-key"}) as (port, proc, log):
        yield port, proc, log


@pytest.mark.slow
def test_the_api_key_from_the_environment_works(server):
    port, _, log = server
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == TINY_TAG
    assert "key required" in log.read_text() and "warning" not in log.read_text()


@pytest.mark.slow
def test_20_mb_of_bodies_do_not_grow_the_servers_memory_by_their_size(server):
    port, proc, _ = server
    auth = "Authorization: Bearer env-key\r\n"
    before = peak_rss_mb(proc.pid)
    sent = 0
    for _ in range(10):  # 10 chunked bodies of 2 MB: the server keeps at most 1 MB of each
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(post_head(port, auth))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(32):
                    s.sendall(b"%x\r\n%s\r\n" % (64 * 1024, b" " * (64 * 1024)))
                    sent += 64 * 1024
            assert read_reply(s)[0] == 413
    status, _ = raw_request(port, post_head(port, auth, length=20 * MB), timeout=5)  # announced: not even read
    assert status == 413
    growth = peak_rss_mb(proc.pid) - before
    assert sent >= 10 * MB and growth < 8, f"peak RSS grew {growth:.1f} MB"


@pytest.mark.slow
def test_health_answers_while_300_idle_connections_are_held(server):
    port, _, log = server
    idle = []
    try:
        for i in range(300):  # half send nothing, half the start of a request that never ends
            # from three addresses, 100 each (the most one client may hold), all of 127/8 is loopback
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{2 + i % 3}", 0))
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(s)
        times = []
        with httpx.Client(timeout=5) as client:
            for _ in range(5):
                start = time.monotonic()
                assert client.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
                times.append(time.monotonic() - start)
                with httpx.Client(timeout=5) as fresh:  # a new connection each time, too
                    assert fresh.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert max(times) < 3, times
    finally:
        for s in idle:
            s.close()
    assert "Too many open files" not in log.read_text()


@pytest.mark.slow
def test_a_client_that_hangs_up_mid_body_is_one_log_line(server):
    port, _, log = server
    before = len(log.read_text().splitlines())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(post_head(port, "Authorization: Bearer env-key\r\n", length=1000) + b'{"messages": ')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "hung up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    new = log.read_text().splitlines()[before:]
    assert [line for line in new if "hung up" in line] and len(new) == 1, new
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_connections_past_the_open_files_limit_are_turned_away_quietly(tiny_home, tiny, tmp_path):
    """With 512 open files allowed the server takes 256 connections (256 kept for the rest); 400
    sockets get no 'Too many open files' in the log, and the server serves again once they go.
    The key comes from a 0600 file."""
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    key_file.chmod(0o600)
    with serve_process(tiny_home, "--api-key-file", str(key_file), "--header-timeout", "60",
                       "--max-client-connections", "0", nofile=512) as (port, _, log):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer file-key"}, timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        held = []
        try:
            for _ in range(400):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            status, _ = raw_request(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), timeout=5)
            assert status == 503
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        text = log.read_text()
        assert "cut to 256" in text and "Too many open files" not in text and "Traceback" not in text
        assert 1 <= text.count("turned away") <= 2


# -----------------------------------------------------------------------------
# The API key's other sources, checked before any model is loaded


def test_a_key_file_other_users_can_read_is_refused_in_one_line(tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    key_file.chmod(0o644)
    rc = picochat_main(["serve", "--api-key-file", str(key_file)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "other users may read" in err and "chmod 600" in err


@pytest.mark.slow
def test_a_fifo_as_key_file_is_one_line_not_a_hang(tiny_home, tmp_path):
    """Opening a FIFO for reading waits for a writer: start-up used to hang there forever."""
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    try:
        proc = subprocess.run([sys.executable, "-m", "picochat", "serve", "--api-key-file", str(fifo)],
                              env=env_for(tiny_home), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("picochat serve hung on a FIFO given as --api-key-file") from None
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a regular file" in proc.stderr, proc.stderr


@pytest.mark.parametrize("content, words", [("", "first line is empty"), ("\n\n", "first line is empty")])
def test_an_empty_key_file_is_refused(tmp_path, capsys, content, words):
    key_file = tmp_path / "key"
    key_file.write_text(content)
    key_file.chmod(0o600)
    assert picochat_main(["serve", "--api-key-file", str(key_file)]) == 2
    assert words in capsys.readouterr().err


def test_api_key_on_the_command_line_warns_that_ps_shows_it(capsys):
    with socket.socket() as taken:  # the port check fails next: nothing is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc = picochat_main(["serve", "--api-key", "k", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 2
    assert err[0].startswith("picochat serve: warning: --api-key on the command line is visible") and "ps" in err[0]
    assert "cannot listen" in err[1]


def test_a_public_host_accepts_a_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_API_KEY", "from-env")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        rc = picochat_main(["serve", "--host", "0.0.0.0", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen" in err and "warning" not in err
    assert "PICOCHAT_API_KEY" not in os.environ  # read once, then out of the environment children inherit
