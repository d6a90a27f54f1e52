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
Fuzz: `--fuzz` seeded request bodies, every numeric field at its float extremes (denormals, 1e-45, the largest
double, inf, NaN, overflow and underflow literals, huge integers); prints the count of 500s (and of streams that
ended in an error event), which must be 0.
Hostile: `--hostile` connections held open against the server (half-sent bodies, request heads that never end,
streams whose reader reads nothing; each reopened when the server closes it) while /health is asked every 20 ms
on a fresh connection for `--hostile-seconds`: its latency (p50, p99, max) and how many were 200, 503 or failed.
Start the server with a small cap (`--max-connections 64`) to see the cap at work.
"""

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import socket
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


NUMERIC_FIELDS = ["temperature", "top_k", "max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs", "top_p",
                  "presence_penalty", "frequency_penalty"]
# JSON literals as a hostile client writes them: float extremes, non-finite values, overflow and underflow, huge ints
EXTREMES = ["0", "-0.0", "5e-324", "-5e-324", "1e-45", "1.401298464324817e-45", "1.1754943508222875e-38", "1e-38",
            "1e-30", "1e-7", "0.5", "1", "1.0", "2", "2.0000000000000004", "3.4028234663852886e38", "1.7976931348623157e308",
            "-1.7976931348623157e308", "1e309", "-1e309", "1e-400", "NaN", "Infinity", "-Infinity", "-1", "4096", "4097",
            "8", "9", "20", "21", "200", "201", "9007199254740993", "9223372036854775807", "9223372036854775808",
            "18446744073709551616", "1" + "0" * 400, "true", "false", "null"]


def fuzz_bodies(n, seed=30, max_tokens=4):
    """n request bodies (path, bytes): first every numeric field at every extreme, then seeded mixes of them."""
    rng = random.Random(seed)
    cases = [[(field, value)] for field in NUMERIC_FIELDS for value in EXTREMES]
    while len(cases) < n:
        cases.append([(rng.choice(NUMERIC_FIELDS), rng.choice(EXTREMES)) for _ in range(rng.randint(2, 4))])
    for i, case in enumerate(cases[:n]):
        fields = {"max_tokens": str(max_tokens), "stream": rng.choice(["false", "true"])}
        fields.update(case)
        if "top_logprobs" in fields:
            fields["logprobs"] = "true"
        body = '{"messages": ' + json.dumps(PROMPT) + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}"
        yield ("/v1/chat/completions", "/chat/completions")[i % 2], body.encode()


async def _fuzz(url, api_key, n, seed, concurrency=4):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    statuses, stream_errors, bodies = {}, 0, list(fuzz_bodies(n, seed))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0)) as client:
        async def worker(k):
            nonlocal stream_errors
            for path, body in bodies[k::concurrency]:
                r = await client.post(path, content=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200 and '"error"' in r.text:  # a stream that failed after its 200
                    stream_errors += 1
        await asyncio.gather(*[worker(k) for k in range(concurrency)])
    return {"bodies": len(bodies), "statuses": dict(sorted(statuses.items())), "500s": statuses.get(500, 0),
            "stream_errors": stream_errors}


async def _hostile_connection(host, port, kind, api_key, stop):
    """One hostile client, reopened whenever the server closes it, until `stop` is set."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    while not stop.is_set():
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a stalled reader's window stays small
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            await asyncio.sleep(0.05)
            continue
        try:
            if kind == "half_body":
                writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
                             f"Content-Length: 100000\r\n\r\n{{\"messages\": [".encode())
            elif kind == "half_head":
                writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())
            else:  # a stream it never reads
                body = json.dumps({"messages": PROMPT, "stream": True, "max_tokens": 4096})
                writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
                await stop.wait()
                continue
            while await reader.read(65536):
                pass  # until the server closes it (a 503 when it made room, or the head or body deadline)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _probe_health(host, port):
    """Seconds to a /health status line on a fresh connection, and the status (None: no HTTP reply)."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
    except (OSError, asyncio.TimeoutError):
        return time.perf_counter() - t0, None
    status = line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1 ") else None
    return time.perf_counter() - t0, status


async def _hostile(url, api_key, n, seconds):
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    host, port = host.strip("[]"), int(port)
    stop = asyncio.Event()
    kinds = ["half_body", "half_head", "stalled_reader"]
    clients = [asyncio.create_task(_hostile_connection(host, port, kinds[i % 3], api_key, stop)) for i in range(n)]
    await asyncio.sleep(0.5)  # all of them connected and sending
    probes, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        probes.append(await _probe_health(host, port))
        await asyncio.sleep(0.02)
    stop.set()
    for c in clients:
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    latency = [t for t, _ in probes]
    count = lambda status: sum(1 for _, s in probes if s == status)
    return {"connections": n, "probes": len(probes), "ok": count("200"), "busy": count("503"),
            "errors": len(probes) - count("200") - count("503"), "p50_s": percentile(latency, 0.5),
            "p99_s": percentile(latency, 0.99), "max_s": max(latency) if latency else None}


def run(url, api_key=None, streams=50, burst=1000, max_tokens=64, server_pid=None, fuzz=0, fuzz_seed=30, hostile=0,
        hostile_seconds=10.0):
    """The phases against a running server; returns the report (a dict of plain numbers)."""
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
    if fuzz:
        report["fuzz"] = asyncio.run(_fuzz(url, api_key, fuzz, fuzz_seed))
    if hostile:
        report["hostile"] = {k: r4(v) if isinstance(v, float) else v
                             for k, v in asyncio.run(_hostile(url, api_key, hostile, hostile_seconds)).items()}
    report["server_rss_mb"]["end"] = rss_mb(server_pid)
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
    parser.add_argument("--max-connections", type=int, default=None, help="the started server's cap (default: room for the burst)")
    parser.add_argument("--fuzz", type=int, default=0, help="seeded fuzz bodies to send (at least 1000 for the check)")
    parser.add_argument("--fuzz-seed", type=int, default=30)
    parser.add_argument("--hostile", type=int, default=0, help="hostile connections held open while /health is timed")
    parser.add_argument("--hostile-seconds", type=float, default=10.0)
    args = parser.parse_args()

    proc, base = None, None
    url, pid, api_key = args.url, args.server_pid, args.api_key
    if url is None:
        api_key = secrets.token_hex(16)
        env = {**os.environ, "NANOCHAT_API_KEY": api_key}
        flags = ["--num-gpus", str(args.num_gpus), "--max-queue", str(args.burst + args.streams),
                 "--max-connections", str(args.max_connections or args.burst + args.streams + 100)]
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
        report = run(url, api_key, args.streams, args.burst, args.max_tokens, pid, args.fuzz, args.fuzz_seed, args.hostile,
                     args.hostile_seconds)
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
    if "fuzz" in report:
        f = report["fuzz"]
        print(f"fuzz: {f['bodies']} seeded bodies (seed {args.fuzz_seed}), statuses {f['statuses']}: "
              f"{f['500s']} responses with status 500, {f['stream_errors']} streams ending in an error")
    if "hostile" in report:
        h = report["hostile"]
        print(f"/health with {h['connections']} hostile connections held open: {h['probes']} probes, {h['ok']} ok, "
              f"{h['busy']} 503, {h['errors']} failed; latency p50 {h['p50_s']} s, p99 {h['p99_s']} s, max {h['max_s']} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
