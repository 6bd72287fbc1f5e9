"""
`picochat serve`: an OpenAI-compatible chat API and the web chat, with continuous batching.

Loads one model replica per device (every visible GPU with --device cuda, else one), each with its
own scheduler thread serving up to --max-batch-size requests per decode step, and runs the FastAPI
app (picochat/serve/app.py) under uvicorn. docs/SERVING.md has the API, the limits and examples.

    picochat serve                                   # http://127.0.0.1:8000, the only SFT model
    picochat serve --source mid --model-tag d4 --max-batch-size 16
    PICOCHAT_API_KEY=... picochat serve --host 0.0.0.0                 # reachable from outside
    picochat serve --host 0.0.0.0 --api-key-file ~/.picochat-key      # the same, the key in a 0600 file

Binds 127.0.0.1 unless told otherwise, and refuses a non-loopback --host without an API key. The
key comes from $PICOCHAT_API_KEY or --api-key-file (--api-key works too, with a warning: every
local user sees a command line in `ps`). Slow and idle clients are cut off (--header-timeout,
--body-timeout) and open connections capped (--max-connections, --max-client-connections): see
picochat/serve/app.py.
"""
from __future__ import annotations

import ipaddress
import os
import resource
import socket
import stat
import sys

import torch

from picochat.checkpoint import load_model, resolve_model_dir
from picochat.cli import Parser, add_device_args, positive_int
from picochat.common import TRAINING_STAGES, PicochatError, color_enabled, dist_info, resolve_device, resolve_dtype
from picochat.engine import Engine
from picochat.serve.api import MAX_PENALTY, MAX_TEMPERATURE, MAX_TOKENS, MAX_TOP_K, Defaults
from picochat.serve.app import (BODY_TIMEOUT_S, FD_RESERVE, HEADER_TIMEOUT_S, LOOPBACK_NAMES, MAX_CLIENT_CONNECTIONS,
                                MAX_CONNECTIONS, create_app, serve_config)
from picochat.scheduler import EnginePool, Scheduler
from picochat.tokenizer import get_tokenizer


def build_parser() -> Parser:
    p = Parser("serve", "Serve a chat model over an OpenAI-compatible HTTP API and a web chat page.")
    p.add_argument("--source", default="sft", choices=list(TRAINING_STAGES), help="which stage's checkpoint")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default="", help="require 'Authorization: Bearer <key>' on /v1/* and /metrics "
                   "(visible to local users in ps: prefer $PICOCHAT_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", default="", help="read the API key from this file (its first line); "
                   "refused if other users may read it")
    p.add_argument("--max-connections", type=positive_int, default=MAX_CONNECTIONS,
                   help="open connections at most; more are answered 503 and closed (cut to the open-files limit)")
    p.add_argument("--max-client-connections", type=int, default=MAX_CLIENT_CONNECTIONS,
                   help="open connections from one address (IPv6: one /64) at most; more are answered 503 "
                        "(0: no per-client cap, e.g. behind a reverse proxy on this machine)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds a client has to send a request's headers, else it is cut off (408)")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                   help="seconds a client has to send a request's body, else it is answered 408")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="decode slots per engine (GPU)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a slot, per engine, before answering 429")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take (queued + generating) before it is cut with finish_reason 'length'")
    p.add_argument("--temperature", type=float, default=0.8, help="when a request gives none (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="when a request gives none (0: no top-k)")
    p.add_argument("--max-tokens", type=int, default=512, help="when a request gives none (cut to the context)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="when a request gives none (-2..2)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="when a request gives none (-2..2)")
    p.add_argument("--num-gpus", type=int, default=0, help="with --device cuda: engines on GPUs 0..n-1 (0: all)")
    add_device_args(p, auto_dtype="float32 on CPUs, so a reply never depends on the batch; bf16 on GPUs")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


API_KEY_ENV = "PICOCHAT_API_KEY"


def read_key_file(path: str) -> str:
    """The first line of `path`, a regular file that no other user may read or write (0600).
    Opened without blocking: opening a FIFO for reading would otherwise wait for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise PicochatError(f"--api-key-file {path}: cannot open it ({e.strerror or e})")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())  # of the file we read, not of whatever the path names later
        if not stat.S_ISREG(info.st_mode):
            raise PicochatError(f"--api-key-file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise PicochatError(f"--api-key-file {path}: other users may read or change it (mode "
                                f"{stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")
        text = f.read(4097)
    if len(text) > 4096:
        raise PicochatError(f"--api-key-file {path}: over 4 KB; it should hold one line, the key")
    try:
        key = text.decode("utf-8").splitlines()[0].strip() if text.strip() else ""
    except UnicodeDecodeError:
        raise PicochatError(f"--api-key-file {path}: not UTF-8 text")
    if not key:
        raise PicochatError(f"--api-key-file {path}: the first line is empty; it should be the key")
    return key


def resolve_api_key(args) -> str:
    """The API key from --api-key-file, --api-key (with a warning) or $PICOCHAT_API_KEY; '' if none.
    The variable is removed from our environment once read, so no child process inherits it."""
    from_env = os.environ.pop(API_KEY_ENV, "").strip()
    if args.api_key and args.api_key_file:
        raise PicochatError("give the API key once: --api-key or --api-key-file, not both")
    if args.api_key_file:
        return read_key_file(args.api_key_file)
    if args.api_key:
        print(f"picochat serve: warning: --api-key on the command line is visible to every local user "
              f"(ps, /proc); pass it in ${API_KEY_ENV} or --api-key-file instead", file=sys.stderr, flush=True)
        return args.api_key
    return from_env


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(requested: int, open_files: int) -> int:
    """--max-connections, cut so that connections never run the process out of file descriptors
    (accept() failing with 'Too many open files' logs a traceback per try)."""
    cap = min(requested, open_files - FD_RESERVE)
    if cap < 1:
        raise PicochatError(f"the open-files limit is {open_files}: too low to serve (raise it with ulimit -n)")
    if cap < requested:
        print(f"picochat serve: warning: --max-connections cut to {cap} (open-files limit {open_files}, "
              f"{FD_RESERVE} kept for the rest)", file=sys.stderr, flush=True)
    return cap


def check_args(args) -> None:
    args.api_key = resolve_api_key(args)
    if not is_loopback(args.host) and not args.api_key:
        raise PicochatError(f"--host {args.host} makes the server reachable from other machines; "
                            f"set an API key too (${API_KEY_ENV}, --api-key-file) or bind 127.0.0.1")
    for name in ("header_timeout", "body_timeout"):
        if not 0 < getattr(args, name) <= 3600:
            raise PicochatError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds, got {getattr(args, name)}")
    if not 0 <= args.temperature <= MAX_TEMPERATURE:
        raise PicochatError(f"--temperature must be in [0, {MAX_TEMPERATURE}], got {args.temperature}")
    if not 0 <= args.top_k <= MAX_TOP_K:
        raise PicochatError(f"--top-k must be in [0, {MAX_TOP_K}], got {args.top_k}")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -MAX_PENALTY <= getattr(args, name) <= MAX_PENALTY:
            raise PicochatError(f"--{name.replace('_', '-')} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], "
                                f"got {getattr(args, name)}")
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise PicochatError(f"--max-tokens must be in [1, {MAX_TOKENS}], got {args.max_tokens}")
    if not 0 < args.port < 65536:
        raise PicochatError(f"--port must be in 1..65535, got {args.port}")
    if args.request_timeout <= 0:
        raise PicochatError(f"--request-timeout must be positive, got {args.request_timeout}")
    if args.max_client_connections < 0:
        raise PicochatError(f"--max-client-connections must be 0 (no cap) or positive, got {args.max_client_connections}")
    check_port_free(args.host, args.port)


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading a model, not with uvicorn's traceback after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise PicochatError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there, "
                                f"or a port that needs privileges? choose another --port)")


def engine_devices(requested: str, num_gpus: int) -> list[torch.device]:
    if num_gpus < 0:
        raise PicochatError(f"--num-gpus must be 0 (all) or a positive count, got {num_gpus}")
    device = resolve_device(requested, dist_info())
    if device.type != "cuda":
        return [device]
    available = torch.cuda.device_count()
    if num_gpus > available:
        raise PicochatError(f"--num-gpus {num_gpus} but only {available} CUDA GPU(s) are visible")
    return [torch.device("cuda", i) for i in range(num_gpus or available)]


def serving_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto' serves in fp32 on a CPU: rows then compute the same numbers alone or in any batch
    (bf16 matmuls round differently with the batch's shape, which changed 4 of 32 greedy GSM8K
    answers in benchmarks/eval_speed.py), and decoding a d4 model was faster in fp32 there
    anyway (10.9 vs 7.5 problems/s). On GPUs 'auto' is bf16, as in training."""
    if requested == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_dtype(requested, device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    max_connections = connection_cap(args.max_connections, raise_open_files_limit())
    import uvicorn  # only the serve stage needs it

    tokenizer = get_tokenizer()
    tag = resolve_model_dir(args.source, args.model_tag or None).name
    schedulers = []
    for device in engine_devices(args.device, args.num_gpus):
        model, meta = load_model(args.source, tag, device, step=None if args.step < 0 else args.step,
                                 compute_dtype=serving_dtype(args.dtype, device), tokenizer=tokenizer)
        model.prepare_for_inference()  # weights cast to the serving dtype once, not every step
        schedulers.append(Scheduler(Engine(model, tokenizer), args.max_batch_size, args.max_queue))
    config = schedulers[0].engine.model.config
    app = create_app(EnginePool(schedulers), tokenizer, model_name=tag, context_len=config.sequence_len,
                     defaults=Defaults(args.temperature, args.top_k, args.max_tokens,
                                       args.frequency_penalty, args.presence_penalty),
                     api_key=args.api_key or None, request_timeout=args.request_timeout,
                     allowed_hosts=LOOPBACK_NAMES if is_loopback(args.host) else None,
                     body_timeout=args.body_timeout)
    devices = ", ".join(str(s.device) for s in schedulers)
    dtype = str(schedulers[0].engine.model.compute_dtype).removeprefix("torch.")
    print(f"picochat serve: {args.source} model {tag} step {meta['step']} on {devices} in {dtype}, "
          f"{args.max_batch_size} slots per engine, context {config.sequence_len} tokens", flush=True)
    print(f"picochat serve: http://{args.host}:{args.port}/ (API at /v1, key {'required' if args.api_key else 'off'})",
          flush=True)
    per_client = f"{args.max_client_connections} per client" if args.max_client_connections else "no per-client cap"
    print(f"picochat serve: at most {max_connections} connections ({per_client}); headers (up to 16 KB) within "
          f"{args.header_timeout:g} s, bodies (up to 1 MB) within {args.body_timeout:g} s", flush=True)
    server_config = serve_config(app, args.host, args.port, max_connections=max_connections,
                                 header_timeout=args.header_timeout,
                                 max_client_connections=args.max_client_connections, log_level="info",
                                 use_colors=color_enabled(sys.stdout) and color_enabled(sys.stderr))
    uvicorn.Server(server_config).run()
    return 0
