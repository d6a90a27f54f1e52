"""
Serving under load: throughput, latency (p50/p95) and time to first token of scripts.chat_web under concurrent
streams and a burst of requests sent at once, with the server's memory (RSS) before and after.

    python -m bench.bench_serve --tiny                          # the tests' tiny checkpoint, served on CPU
    python -m bench.bench_serve -i sft                          # a saved checkpoint
    python -m bench.bench_serve --url http://127.0.0.1:8000 --server-pid 1234   # a server already running

Streams: `--streams` clients at once, each one streamed reply (OpenAI API, stream=true); time to first token
is to the first non-empty content delta, tokens/s counts completion tokens over the phase's wall time.
Burst: `--burst` non-streaming requests sent at once. The server this script starts has a queue and a
connection cap big enough for the burst, so every request is served; against a smaller queue the refused
ones (503) are counted, not timed.
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

from nanochat.stage import STAGE_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [{"role": "user", "content": "tell me about the owl"}]


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        return round(int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024, 1)


async def _stream(client, max_tokens):
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return 200, first, time.perf_counter() - t0, tokens


async def _complete(client, max_tokens):
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
    return r.status_code, time.perf_counter() - t0, tokens


async def _phase(url, api_key, n, job):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[job(client) for _ in range(n)], return_exceptions=True)
        return results, time.perf_counter() - t0


def _counts(results):
    """(ok results, refused count, error count): exceptions and statuses other than 200/503 are errors."""
    done = [r for r in results if not isinstance(r, BaseException)]
    ok, refused = [r for r in done if r[0] == 200], sum(1 for r in done if r[0] == 503)
    return ok, refused, len(results) - len(ok) - refused


def run(url, api_key=None, streams=50, burst=1000, max_tokens=64, server_pid=None):
    """Both phases against a running server; returns the report (a dict of plain numbers)."""
    r4 = lambda x: None if x is None else round(x, 4)
    report = {"server_rss_mb": {"before": rss_mb(server_pid)}}

    results, wall = asyncio.run(_phase(url, api_key, streams, lambda c: _stream(c, max_tokens)))
    ok, refused, errors = _counts(results)
    ttft, latency, tokens = [r[1] for r in ok if r[1] is not None], [r[2] for r in ok], sum(r[3] for r in ok)
    report["streams"] = {"clients": streams, "ok": len(ok), "refused": refused, "errors": errors, "wall_s": r4(wall),
                         "tokens": tokens, "tokens_per_s": r4(tokens / wall),
                         "ttft_p50_s": r4(percentile(ttft, 0.5)), "ttft_p95_s": r4(percentile(ttft, 0.95)),
                         "p50_s": r4(percentile(latency, 0.5)), "p95_s": r4(percentile(latency, 0.95))}
    report["server_rss_mb"]["after_streams"] = rss_mb(server_pid)

    results, wall = asyncio.run(_phase(url, api_key, burst, lambda c: _complete(c, max_tokens)))
    ok, refused, errors = _counts(results)
    latency, tokens = [r[1] for r in ok], sum(r[2] for r in ok)
    report["burst"] = {"requests": burst, "ok": len(ok), "refused": refused, "errors": errors, "wall_s": r4(wall),
                       "requests_per_s": r4(len(ok) / wall), "tokens_per_s": r4(tokens / wall),
                       "p50_s": r4(percentile(latency, 0.5)), "p95_s": r4(percentile(latency, 0.95))}
    report["server_rss_mb"]["after"] = rss_mb(server_pid)
    return report


def start_server(flags, env):
    """scripts.chat_web on a free port; returns (process, url)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="bench_serve_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", "0", *flags], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while True:
        with open(log.name) as f:
            text = f.read()
        if found := re.search(r"serving \S+ at (http://\S+)", text):
            return proc, found.group(1), log.name
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"the server did not start:\n{text}")
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description="Benchmark chat_web: concurrent streams and a burst of requests")
    parser.add_argument("--url", type=str, default=None, help="a running server (else one is started)")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: its pid, for the memory figures")
    parser.add_argument("--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"), help="with --url")
    parser.add_argument("--tiny", action="store_true", help="serve the tests' tiny checkpoint (built on first use)")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=STAGE_NAMES)
    parser.add_argument("--model-tag", type=str, default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"])
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    proc, base = None, None
    url, pid, api_key = args.url, args.server_pid, args.api_key
    if url is None:
        api_key = secrets.token_hex(16)
        env = {**os.environ, "NANOCHAT_API_KEY": api_key}
        flags = ["--num-gpus", str(args.num_gpus), "--max-queue", str(args.burst + args.streams),
                 "--max-connections", str(args.burst + args.streams + 100)]
        if args.tiny:
            from nanochat.tiny import TAG, build_tiny  # imports torch: only when it is asked for
            base = tempfile.mkdtemp(prefix="bench_serve_")
            build_tiny(base)
            env.update(NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            flags = [*flags, "-i", "sft", "--model-tag", TAG, "--device-type", args.device_type or "cpu"]
        else:
            flags += ["-i", args.source]
            for flag, value in (("--model-tag", args.model_tag), ("--step", args.step), ("--device-type", args.device_type)):
                if value not in (None, ""):
                    flags += [flag, str(value)]
        proc, url, log = start_server(flags, env)
        pid = proc.pid
        print(f"server: {url} (pid {pid}, log {log})")
    try:
        report = run(url, api_key, args.streams, args.burst, args.max_tokens, pid)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    s, b, m = report["streams"], report["burst"], report["server_rss_mb"]
    print(f"{args.streams} concurrent streams: {s['ok']} ok, {s['refused']} refused, {s['errors']} errors in {s['wall_s']} s; "
          f"{s['tokens_per_s']} tokens/s; time to first token p50 {s['ttft_p50_s']} s, p95 {s['ttft_p95_s']} s; "
          f"latency p50 {s['p50_s']} s, p95 {s['p95_s']} s")
    print(f"burst of {args.burst}: {b['ok']} ok, {b['refused']} refused, {b['errors']} errors in {b['wall_s']} s; "
          f"{b['requests_per_s']} requests/s, {b['tokens_per_s']} tokens/s; latency p50 {b['p50_s']} s, p95 {b['p95_s']} s")
    print(f"server memory (RSS): {m['before']} MB before, {m['after_streams']} MB after the streams, {m['after']} MB after the burst")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
