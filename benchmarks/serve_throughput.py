"""
Serving throughput of `picochat serve`: aggregate tokens/s and request latency for 1, 4 and 16
concurrent streaming clients, with continuous batching (--max-batch-size 16) against one request at
a time (--max-batch-size 1), both measured in the same run on the same model.

    python benchmarks/serve_throughput.py                         # a random d4 model, made here
    python benchmarks/serve_throughput.py --model-tag d4 --source sft   # a trained checkpoint
    python benchmarks/serve_throughput.py --concurrency 1,4,16 --requests 32 --max-tokens 128
    python benchmarks/serve_throughput.py --batch-sizes 16 --code /tmp/old   # another version's code

Without --model-tag it writes a throwaway PICOCHAT_HOME with a 4,096-token tokenizer and a randomly
initialised d4 SFT checkpoint (context 1,024). A random model rarely emits <|assistant_end|>, so
nearly every reply runs to --max-tokens and the two servers do the same work. Each server is a real
`picochat serve` process; the clients are asyncio streams in this process, greedy (temperature 0),
with prompts of 20 to 200 tokens. tok/s counts completion tokens (usage from the stream) over the
wall time of all requests at that concurrency; latency is request to [DONE], TTFT to the first
content. Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = "the king queen lord lady good noble sir shall we do now come go away love night day heaven earth".split()


def make_random_home(home: Path, depth: int) -> str:
    """A tokenizer and a random `sft` checkpoint in `home`; returns the model tag."""
    import torch

    from picochat.checkpoint import save_checkpoint
    from picochat.model import GPT, config_from_depth
    from picochat.tokenizer import train_tokenizer
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=200)) + f" {i} {i * 7} ." for i in range(3000)]
    tokenizer = train_tokenizer(iter(corpus), vocab_size=4096)
    tokenizer.save(home / "tokenizer")
    config = config_from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=1024)
    model = GPT(config)
    model.init_weights(seed=0)
    with torch.no_grad():  # the zero-initialised head would make every logit equal
        model.lm_head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    tag = f"bench-d{depth}"
    meta = {"step": 0, "model_config": config.to_dict(), "user_config": {"model_tag": tag},
            "compute_dtype": "float32"}
    save_checkpoint(home / "checkpoints" / "sft" / tag, 0, model.state_dict(), meta, rank_state={})
    return tag


def start_server(home: Path, port: int, args, max_batch_size: int) -> subprocess.Popen:
    env = dict(os.environ, PICOCHAT_HOME=str(home))
    if args.code:  # another checkout's picochat (the code before a change), first on the path
        env["PYTHONPATH"] = os.pathsep.join([args.code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "picochat", "serve", "--port", str(port), "--source", args.source,
           "--model-tag", args.model_tag, "--device", args.device, "--dtype", args.dtype,
           "--max-batch-size", str(max_batch_size), "--max-queue", "1024"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"picochat serve exited:\n{proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("picochat serve did not get healthy in 300 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def run_load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue = list(prompts)
    results = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url, queue.pop(), max_tokens))
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "ttft": statistics.median(r["ttft"] for r in results),
            "tokens": sum(r["tokens"] for r in results) / len(results)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-tag", default="", help="serve this checkpoint (default: a random model made here)")
    p.add_argument("--source", default="sft", help="stage of --model-tag")
    p.add_argument("--depth", type=int, default=4, help="depth of the random model")
    p.add_argument("--concurrency", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the level)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per reply")
    p.add_argument("--batch-sizes", default="1,16", help="--max-batch-size of the servers compared")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--code", default="", help="serve with the picochat package in this directory (e.g. an "
                   "unpacked `git archive HEAD`), to compare code versions on the same machine")
    args = p.parse_args()

    tmp = None
    if args.model_tag:
        home = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat"))
    else:
        tmp = tempfile.TemporaryDirectory(prefix="picochat-bench-")
        home = Path(tmp.name)
        args.model_tag, args.source = make_random_home(home, args.depth), "sft"
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(0)
    table = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        proc = start_server(home, args.port, args, batch)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(run_load(url, ["warm up"] * 2, 2, 8))
            for level in levels:
                prompts = [" ".join(rng.choices(WORDS, k=rng.randint(20, 200))) for _ in range(max(args.requests, level))]
                table[batch, level] = run = asyncio.run(run_load(url, prompts, level, args.max_tokens))
                print(f"max-batch-size {batch:>2}, {level:>2} clients: {run['tok_s']:8.1f} tok/s, "
                      f"p50 {run['p50']:.2f} s, p95 {run['p95']:.2f} s, TTFT p50 {run['ttft']:.2f} s, "
                      f"{run['tokens']:.0f} tokens/reply", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    base = batches[0]
    print(f"\nmodel {args.source}/{args.model_tag}, {args.max_tokens} tokens per reply, "
          f"{max(args.requests, max(levels))} requests per level\n")
    print("| clients | max-batch-size | tok/s | p50 latency | p95 latency | TTFT p50 | tok/s vs batch " f"{base} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        for batch in batches:
            r = table[batch, level]
            ratio = r["tok_s"] / table[base, level]["tok_s"]
            print(f"| {level} | {batch} | {r['tok_s']:,.0f} | {r['p50']:.2f} s | {r['p95']:.2f} s | "
                  f"{r['ttft']:.2f} s | {ratio:.2f}x |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
