"""
`picochat serve`: an OpenAI-compatible chat API and the web chat, with continuous batching.

Loads one model replica per device (every visible GPU with --device cuda, else one), each with its
own scheduler thread serving up to --max-batch-size requests per decode step, and runs the FastAPI
app (picochat/serve/app.py) under uvicorn. docs/SERVING.md has the API, the limits and examples.

    picochat serve                                   # http://127.0.0.1:8000, the only SFT model
    picochat serve --source mid --model-tag d4 --max-batch-size 16
    picochat serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"   # reachable from outside

Binds 127.0.0.1 unless told otherwise, and refuses a non-loopback --host without --api-key.
"""
from __future__ import annotations

import ipaddress
import socket

import torch

from picochat.checkpoint import load_model, resolve_model_dir
from picochat.cli import Parser, add_device_args, positive_int
from picochat.common import PicochatError, dist_info, resolve_device, resolve_dtype
from picochat.engine import Engine
from picochat.serve.api import MAX_TEMPERATURE, MAX_TOKENS, MAX_TOP_K, Defaults
from picochat.serve.app import LOOPBACK_NAMES, create_app
from picochat.scheduler import EnginePool, Scheduler
from picochat.tokenizer import get_tokenizer


def build_parser() -> Parser:
    p = Parser("serve", "Serve a chat model over an OpenAI-compatible HTTP API and a web chat page.")
    p.add_argument("--source", default="sft", choices=["sft", "mid", "base"], help="which stage's checkpoint")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default="", help="require 'Authorization: Bearer <key>' on /v1/* and /metrics")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="decode slots per engine (GPU)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a slot, per engine, before answering 429")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take (queued + generating) before it is cut with finish_reason 'length'")
    p.add_argument("--temperature", type=float, default=0.8, help="when a request gives none (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="when a request gives none (0: no top-k)")
    p.add_argument("--max-tokens", type=int, default=512, help="when a request gives none (cut to the context)")
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


def check_args(args) -> None:
    if not is_loopback(args.host) and not args.api_key:
        raise PicochatError(f"--host {args.host} makes the server reachable from other machines; "
                            f"set --api-key too (or bind 127.0.0.1)")
    if not 0 <= args.temperature <= MAX_TEMPERATURE:
        raise PicochatError(f"--temperature must be in [0, {MAX_TEMPERATURE}], got {args.temperature}")
    if not 0 <= args.top_k <= MAX_TOP_K:
        raise PicochatError(f"--top-k must be in [0, {MAX_TOP_K}], got {args.top_k}")
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise PicochatError(f"--max-tokens must be in [1, {MAX_TOKENS}], got {args.max_tokens}")
    if not 0 < args.port < 65536:
        raise PicochatError(f"--port must be in 1..65535, got {args.port}")
    if args.request_timeout <= 0:
        raise PicochatError(f"--request-timeout must be positive, got {args.request_timeout}")
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
    import uvicorn  # only the serve stage needs it

    tokenizer = get_tokenizer()
    tag = resolve_model_dir(args.source, args.model_tag or None).name
    schedulers = []
    for device in engine_devices(args.device, args.num_gpus):
        model, meta = load_model(args.source, tag, device, step=None if args.step < 0 else args.step,
                                 compute_dtype=serving_dtype(args.dtype, device), tokenizer=tokenizer)
        schedulers.append(Scheduler(Engine(model, tokenizer), args.max_batch_size, args.max_queue))
    config = schedulers[0].engine.model.config
    app = create_app(EnginePool(schedulers), tokenizer, model_name=tag, context_len=config.sequence_len,
                     defaults=Defaults(args.temperature, args.top_k, args.max_tokens),
                     api_key=args.api_key or None, request_timeout=args.request_timeout,
                     allowed_hosts=LOOPBACK_NAMES if is_loopback(args.host) else None)
    devices = ", ".join(str(s.device) for s in schedulers)
    dtype = str(schedulers[0].engine.model.compute_dtype).removeprefix("torch.")
    print(f"picochat serve: {args.source} model {tag} step {meta['step']} on {devices} in {dtype}, "
          f"{args.max_batch_size} slots per engine, context {config.sequence_len} tokens", flush=True)
    print(f"picochat serve: http://{args.host}:{args.port}/ (API at /v1, key {'required' if args.api_key else 'off'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
