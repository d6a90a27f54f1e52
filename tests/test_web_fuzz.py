"""chat_web under hostile input, as an attacker would try it (issue 14, items 6-12): the real CLI server
(`python -m scripts.chat_web` on the tiny checkpoint, a real uvicorn on loopback, its log captured) gets
malformed and huge bodies, a seeded fuzz of request bodies, idle and half-sent connections, a burst past its
queue, requests without the API key or from a foreign Host, and uploads abandoned halfway; in-process servers
with scripted models cover tool-call rendering, a non-streaming client that leaves, and the connection cap.
Every wait is bounded; the server process is killed on any failure."""

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from bench import bench_serve
from nanochat.engine import Engine
from nanochat.tokenizer import Tokenizer
from scripts.chat_web import MAX_BODY_BYTES, Worker, bind, create_app, make_server
from tests.helpers_tiny import ROOT, ScriptedModel, build_tiny

KEY = "test-key-" + "x" * 24
HELLO = [{"role": "user", "content": "hello"}]
MAX_QUEUE, MAX_CONNECTIONS, HEADER_TIMEOUT = 3, 24, 1.0
# what a Python exception looks like when it leaks into a reply
INTERNALS = re.compile(r"Traceback|File \"|(Value|Type|Key|Recursion|Attribute|Index|Runtime)Error|Exceeds the limit|object has no")


class CliServer:
    """`python -m scripts.chat_web` in a subprocess; stdout and stderr go to a log file."""

    def __init__(self, base_dir, log_path, *flags):
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "NANOCHAT_API_KEY": KEY}
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--model-tag", "tiny",
                                      "--device-type", "cpu", "--port", "0", "--temperature", "0", *flags],
                                     cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while not (found := re.search(r"serving \S+ at (http://\S+)", self.log())):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.1)
        self.url = found.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def client(self, **kwargs):
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=20, **kwargs)

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)
        self.log_file.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_base")
    build_tiny(base)
    srv = CliServer(base, tmp_path_factory.mktemp("log") / "server.log", "--max-tokens", "24",
                    "--max-queue", str(MAX_QUEUE), "--max-connections", str(MAX_CONNECTIONS),
                    "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "2")
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def raw_request(port, data, wait=5.0, close_after_send=False):
    """Send raw bytes; returns what the server answered before closing (or `wait` seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        if close_after_send:
            return b""
        chunks, deadline = [], time.time() + wait
        try:
            while time.time() < deadline and (chunk := s.recv(65536)):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


def post_head(path, length, extra=""):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {length}\r\n\r\n").encode()


def assert_clean_error(r, status):
    assert r.status_code == status, (r.status_code, r.text[:300])
    message = r.json()["error"]["message"]
    assert isinstance(message, str) and 0 < len(message) < 300 and not INTERNALS.search(message), message

# -----------------------------------------------------------------------------
# 6: malformed bodies are 400 with a clear message, never 500, never internals; plus a seeded fuzz


HUGE_INT = b"9" * 5000
MALFORMED = [
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + HUGE_INT + b"}", "number is too long"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + HUGE_INT + b"}", "number is too long"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a": ' * 60_000 + b"1" + b"}" * 60_000, "nested too deeply"),
    (json.dumps({"messages": [{"role": "user", "content": [[[[["deep"]]]]]}]}).encode(), "content must be"),
    (json.dumps({"messages": HELLO, "max_tokens": 10**300}).encode(), "max_tokens must be between"),
    (json.dumps({"messages": HELLO, "temperature": [1] * 10_000}).encode(), "temperature must be a number"),
    (json.dumps({"messages": [{"role": "x" * 100_000, "content": "hi"}]}).encode(), "role must be"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature must be between"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1e999}', "max_tokens must be an integer"),
]


def test_malformed_bodies_are_400_without_internals(server):
    with server.client() as client:
        for path in ("/chat/completions", "/v1/chat/completions"):
            for body, words in MALFORMED:
                r = client.post(path, content=body, headers={"content-type": "application/json"})
                assert_clean_error(r, 400)
                assert words in r.json()["error"]["message"], (body[:80], r.json())
        assert client.get("/health").json()["status"] == "ok"


def _mutations(rng, n):
    """Request bodies from a valid one: fields replaced by hostile values, keys dropped, bytes flipped (the
    valid ones left ask for 4 tokens, or the server's default of 24)."""
    hostile = [None, True, -1, 0, 2**63, 10**40, -10**40, 1e308, float("inf"), "", "x" * 10_000, [], {}, [[[]]],
               {"role": "user"}, [{"role": "user", "content": None}], "\ud800", 0.5, "7"]
    base = {"messages": [{"role": "user", "content": "what is 3 plus 4?"}], "temperature": 0.5, "top_k": 5,
            "max_tokens": 4, "seed": 1, "n": 1, "stream": False}
    for _ in range(n):
        body = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(base) + ["stream_options", "max_completion_tokens", "zzz"])
            if rng.random() < 0.2:
                body.pop(key, None)
            else:
                body[key] = rng.choice(hostile)
        text = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.3:  # byte-level damage
            pos = rng.randrange(len(text))
            text = text[:pos] + bytes([rng.randrange(256)]) + text[pos + 1:]
        yield text


def test_seeded_fuzz_never_500(server):
    rng = random.Random(14)
    statuses = {}
    with server.client() as client:
        for i, body in enumerate(_mutations(rng, 120)):
            path = ("/chat/completions", "/v1/chat/completions")[i % 2]
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                assert_clean_error(r, r.status_code)
                assert r.status_code in (400, 413), (r.status_code, body[:200], r.text[:200])
    print(f"fuzz statuses: {statuses}")
    assert statuses.get(400, 0) > 60 and 500 not in statuses

# -----------------------------------------------------------------------------
# 7: Content-Length is checked before reading, and reading stops at the limit


def test_body_limits_are_enforced_before_and_while_reading(server):
    before = server.rss_mb()
    # a claimed 10 GB body: refused at once, nothing read or waited on
    t0 = time.time()
    reply = raw_request(server.port, post_head("/v1/chat/completions", 10_000_000_000), wait=3)
    assert reply.startswith(b"HTTP/1.1 413") and time.time() - t0 < 2.5, reply[:200]
    log_before = server.log()
    for _ in range(3):
        reply = raw_request(server.port, post_head("/v1/chat/completions", "1" * 5000), wait=3)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]  # refused by the HTTP parser already
    assert server.log()[len(log_before):].count("Invalid HTTP request") == 1  # logged once, not per attempt
    # a chunked body with no length: the server stops reading just past the limit and closes
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(post_head("/v1/chat/completions", 0).replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n"))
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
        try:
            while sent < 300 << 20:
                s.sendall(chunk)
                sent += 1 << 16
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        try:
            reply = s.recv(65536)
        except ConnectionResetError:  # closed with our chunks still unread in its buffer
            reply = b""
    assert sent < 20 << 20, f"the server read {sent >> 20} MB of a body limited to {MAX_BODY_BYTES >> 20} MB"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert server.rss_mb() - before < 50, (before, server.rss_mb())
    # a body that never finishes: 408 at the body deadline (2 s here)
    reply = raw_request(server.port, post_head("/v1/chat/completions", 1000) + b'{"messages": ', wait=6)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]

# -----------------------------------------------------------------------------
# 8: idle and half-sent connections time out, the connection cap holds, and each is logged once


def read_to_eof(s, deadline):
    """Everything the server sends before it closes (a reset counts as a close: the test fails on what came before)."""
    chunks = []
    while True:
        s.settimeout(max(0.1, deadline - time.time()))
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks) + b"<reset>"
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_idle_connections_cannot_starve_the_server(server):
    log_before = server.log()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4 * MAX_CONNECTIONS)]
    half = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        for s in half:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        # held open, they must not keep others out: those waiting longest for a head make room
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        # each is answered 503 (refused at the cap, or closed to make room) or closed at the head deadline: no resets
        deadline = time.time() + HEADER_TIMEOUT + 5
        replies = [read_to_eof(s, deadline) for s in idle + half]
    finally:
        for s in idle + half:
            s.close()
    refused = [r for r in replies if r]  # closed to make room for newer ones
    assert all(r.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in r.lower() and r.endswith(b"}") for r in refused), \
        [r[-60:] for r in refused if not r.startswith(b"HTTP/1.1 503") or not r.endswith(b"}")]
    assert len(refused) >= 4 * MAX_CONNECTIONS + 5 - MAX_CONNECTIONS  # beyond the cap: none silently dropped
    new = server.log()[len(log_before):]
    assert new.count("longest stalled") == 1 and new.count("no complete request") == 1, new
    assert len(new.splitlines()) <= 3, new


def test_connection_cap_refuses_with_503_when_all_are_busy(tiny_tokenizer):
    script = tiny_tokenizer.encode(" la" * 200)
    model = SlowModel(script, tiny_tokenizer.get_vocab_size(), sequence_len=512)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tiny_tokenizer))], max_tokens=300)
    with serve(app, max_connections=1) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{url}/chat/completions", json={"messages": HELLO}) as r:
            lines = r.iter_lines()  # held: dropping the iterator would close the connection
            next(lines)  # the one connection allowed is busy streaming
            reply = raw_request(int(url.rsplit(":", 1)[1]), b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", wait=3)
            assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower(), reply[:200]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]

# -----------------------------------------------------------------------------
# 9: a bounded queue (503 + Retry-After past it), and a non-streaming client that leaves stops its generation


def wait_for(predicate, what, timeout=20.0):
    """Polls until predicate() is true; fails naming `what` after `timeout` s (a bound, not a measurement)."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_burst_past_the_queue_gets_503_with_retry_after(tiny_tokenizer):
    # the worker is held on its first request until the burst has been sorted: exactly MAX_QUEUE of the burst
    # are admitted however slow the machine is, then all of those are served
    script = tiny_tokenizer.encode(" la" * 3) + [tiny_tokenizer.encode_special("<|assistant_end|>")]
    gate = threading.Event()
    model = GatedModel(script, tiny_tokenizer.get_vocab_size(), gate=gate)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tiny_tokenizer))], max_queue=MAX_QUEUE)
    with serve(app) as url, httpx.Client(timeout=30) as client, ThreadPoolExecutor(20) as pool:
        call = lambda _: httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=60)
        first = pool.submit(call, 0)
        wait_for(lambda: client.get(f"{url}/stats").json()["workers"][0]["busy"], "the first request to run")
        burst = [pool.submit(call, i) for i in range(19)]
        wait_for(lambda: sum(f.done() for f in burst) == 19 - MAX_QUEUE, "the refusals")
        assert client.get(f"{url}/stats").json()["pending_requests"] == 1 + MAX_QUEUE
        gate.set()
        replies = [first.result(60)] + [f.result(60) for f in burst]
        codes = [r.status_code for r in replies]
        assert codes.count(200) == 1 + MAX_QUEUE and codes.count(503) == 19 - MAX_QUEUE, codes  # one ran, three waited
        for r in replies:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
            else:
                assert r.json()["choices"][0]["message"]["content"] == " la" * 3
        stats = client.get(f"{url}/stats").json()
        assert stats["pending_requests"] == 0 and stats["waiting_requests"] == 0 and stats["refused_busy"] == 19 - MAX_QUEUE


def test_non_streaming_client_that_leaves_stops_generation(tiny_tokenizer):
    script = tiny_tokenizer.encode(" la" * 300)  # ~6 s of tokens at 20 ms each
    model = SlowModel(script, tiny_tokenizer.get_vocab_size(), sequence_len=512)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tiny_tokenizer))], max_tokens=400)
    with serve(app) as url, httpx.Client(timeout=10) as client:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"messages": HELLO}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # generating now; then the client leaves
        t0 = time.time()
        while client.get(f"{url}/stats").json()["requests"] < 1:
            assert time.time() - t0 < 3, "generation kept running after the client left"
            time.sleep(0.05)
        stats = client.get(f"{url}/stats").json()
        assert stats["tokens_generated"] < 100 and stats["workers"][0]["busy"] is False and stats["pending_requests"] == 0

# -----------------------------------------------------------------------------
# 10: API key on every route but /health, JSON only, Host checked, no CDN docs


def test_api_key_content_type_host_and_docs(server):
    anonymous = httpx.Client(base_url=server.url, timeout=10)
    assert anonymous.get("/health").status_code == 200
    routes = [("GET", "/"), ("GET", "/stats"), ("GET", "/v1/models"), ("GET", "/nope"), ("POST", "/chat/completions"),
              ("POST", "/v1/chat/completions")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = anonymous.request(method, path, json={"messages": HELLO}, headers=headers)
            assert_clean_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    with server.client() as client:
        assert client.get("/v1/models").status_code == 200
        r = client.post("/v1/chat/completions", content=json.dumps({"messages": HELLO}), headers={"content-type": "text/plain"})
        assert_clean_error(r, 415)  # a form or text/plain POST is what a foreign page may send without a preflight
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]"):
            r = client.get("/v1/models", headers={"Host": host})
            assert_clean_error(r, 400)
            assert "not served" in r.json()["error"]["message"]
        assert client.get("/v1/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert client.get(path).status_code == 404
    anonymous.close()


def test_host_check_serving_all_addresses(tiny_tokenizer):
    app = create_app([Worker(gpu_id=0, engine=Engine(ScriptedModel([0], tiny_tokenizer.get_vocab_size()), tiny_tokenizer))],
                     host="0.0.0.0", allowed_hosts=["chat.example.org"])
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for host, status in [("chat.example.org", 200), ("CHAT.example.org:443", 200), ("10.1.2.3:8000", 200),
                             ("[fe80::1]:8000", 200), ("rebind.example", 400), ("chat.example.org.evil", 400)]:
            assert client.get("/v1/models", headers={"Host": host}).status_code == status, host

# -----------------------------------------------------------------------------
# 11: a tool call reads as its result; completion tokens count only generated tokens


def test_tool_calls_render_as_results(tiny_tokenizer):
    tok = tiny_tokenizer
    special = tok.encode_special
    call = [special("<|python_start|>"), *tok.encode("7+5"), special("<|python_end|>")]
    forced = 2 + len(tok.encode("12"))  # output_start, 12, output_end: forced by the engine, not sampled
    sampled = tok.encode("7 plus 5 is ") + call + [0] * forced + tok.encode(". Done")
    script = sampled + [special("<|assistant_end|>")]
    app = create_app([Worker(gpu_id=0, engine=Engine(ScriptedModel(script, tok.get_vocab_size()), tok))])
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        r = client.post("/v1/chat/completions", json={"messages": HELLO}).json()
        assert r["choices"][0]["message"]["content"] == "7 plus 5 is 12. Done"
        assert r["usage"]["completion_tokens"] == len(sampled) - forced
        sse = client.post("/chat/completions", json={"messages": HELLO}).text
        tokens = [json.loads(line[6:]) for line in sse.split("\n\n") if line.startswith("data: ")]
        assert "".join(t.get("token", "") for t in tokens) == "7 plus 5 is 12. Done" and "<|" not in sse
        body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        chunks = client.post("/v1/chat/completions", json=body).text
        records = [json.loads(line[6:]) for line in chunks.split("\n\n") if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in records if c["choices"])
        assert text == "7 plus 5 is 12. Done" and "<|" not in chunks
        assert records[-1]["usage"]["completion_tokens"] == len(sampled) - forced
        assert client.get("/stats").json()["tokens_generated"] == 3 * (len(sampled) - forced)

# -----------------------------------------------------------------------------
# 12: a client that disconnects during its upload is one log line


def test_upload_disconnect_is_one_log_line(server):
    log_before = server.log()
    raw_request(server.port, post_head("/v1/chat/completions", 100_000) + b'{"messages": [' + b" " * 1000, close_after_send=True)
    deadline = time.time() + 5
    while "disconnected while sending" not in server.log()[len(log_before):]:
        assert time.time() < deadline, server.log()[len(log_before):]
        time.sleep(0.05)
    time.sleep(0.3)  # anything else it would log comes now
    new = server.log()[len(log_before):]
    assert len(new.strip().splitlines()) == 1 and "Traceback" not in new, new
    with server.client() as client:
        assert client.get("/health").status_code == 200

# -----------------------------------------------------------------------------
# bench/bench_serve.py at a small scale, against the same server


def test_bench_serve_reports(server):
    report = bench_serve.run(server.url, api_key=KEY, streams=5, burst=20, max_tokens=8, server_pid=server.proc.pid,
                             fuzz=60, hostile=2 * MAX_CONNECTIONS, hostile_seconds=1.5)
    # the server's queue holds 3 besides the one running: some are refused, the others timed
    assert report["streams"]["ok"] + report["streams"]["refused"] == 5 and report["streams"]["errors"] == 0
    assert report["streams"]["ok"] >= 1 + MAX_QUEUE and report["streams"]["ttft_p50_s"] > 0 and report["streams"]["tokens_per_s"] > 0
    assert report["burst"]["ok"] + report["burst"]["refused"] == 20 and report["burst"]["errors"] == 0
    assert report["burst"]["p95_s"] >= report["burst"]["p50_s"] > 0 and report["server_rss_mb"]["after"] > 0
    # the fuzz covers every numeric field at every extreme before mixing them; none of it is a 500
    assert len(list(bench_serve.fuzz_bodies(1000))) == 1000 > len(bench_serve.NUMERIC_FIELDS) * len(bench_serve.EXTREMES)
    fuzz = report["fuzz"]
    assert fuzz["bodies"] == 60 and sum(fuzz["statuses"].values()) == 60 and fuzz["500s"] == 0 and fuzz["stream_errors"] == 0
    assert set(fuzz["statuses"]) <= {200, 400}, fuzz
    # twice as many hostile connections as the cap held open: /health still answers, with 200 or 503, never a failure
    hostile = report["hostile"]
    assert hostile["probes"] > 0 and hostile["errors"] == 0 and hostile["ok"] > 0 and hostile["p99_s"] >= hostile["p50_s"] > 0

# -----------------------------------------------------------------------------
# in-process servers


class SlowModel(ScriptedModel):
    def forward(self, idx, kv_cache=None):
        time.sleep(0.02)
        return super().forward(idx, kv_cache)


class GatedModel(ScriptedModel):
    """Waits for `gate` before each forward pass."""

    def __init__(self, script, vocab_size, gate, **kwargs):
        super().__init__(script, vocab_size, **kwargs)
        self.gate = gate

    def forward(self, idx, kv_cache=None):
        assert self.gate.wait(60), "the test never opened the gate"
        return super().forward(idx, kv_cache)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("nanochat_base_tok")
    build_tiny(base)
    return Tokenizer.from_directory(os.path.join(base, "tokenizer"))


@contextlib.contextmanager
def serve(app, **limits):
    """chat_web's own server (make_server: head deadline, connection cap) for `app` in a thread; yields its URL."""
    server, sock = make_server(app, "127.0.0.1", 0, **limits), bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            if not thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()

# -----------------------------------------------------------------------------
# issue 30: no 500s, no lock-out, no silent resets

OWL = [{"role": "user", "content": "tell me about the owl"}]


def owl_body(temperature, top_k=1, **extra):
    """A raw JSON body, so that 1e-45, -0.0, NaN or Infinity reach the server as written."""
    rest = "".join(f', "{k}": {json.dumps(v)}' for k, v in extra.items())
    return (f'{{"messages": {json.dumps(OWL)}, "temperature": {temperature}, "top_k": {top_k}, "max_tokens": 8{rest}}}').encode()


def test_tiny_temperatures_reply_as_greedy_and_bad_ones_are_400(server):
    with server.client() as client:
        post = lambda path, body: client.post(path, content=body, headers={"content-type": "application/json"})
        greedy = post("/v1/chat/completions", owl_body(0)).json()["choices"][0]["message"]["content"]
        assert greedy
        for t in ("1e-45", "1e-38", "5e-324", "1e-400", "-0.0", "0.000001"):
            for top_k in (1, 50):
                r = post("/v1/chat/completions", owl_body(t, top_k))
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy, (t, r.text[:200])
                r = post("/v1/chat/completions", owl_body(t, top_k, stream=True))
                assert r.status_code == 200 and '"error"' not in r.text and r.text.endswith("data: [DONE]\n\n"), (t, r.text[-200:])
                records = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                assert "".join(c["choices"][0]["delta"].get("content", "") for c in records if c["choices"]) == greedy
                r = post("/chat/completions", owl_body(t, top_k))
                tokens = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: ")]
                assert tokens[-1] == {"done": True} and "".join(x["token"] for x in tokens[:-1]) == greedy, (t, r.text[:200])
        for t in ("NaN", "Infinity", "-Infinity", "-1e-45", "2.0000001", "1e309"):
            for path in ("/v1/chat/completions", "/chat/completions"):
                r = post(path, owl_body(t))
                assert_clean_error(r, 400)
                assert r.json()["error"]["param"] == "temperature" and "temperature" in r.json()["error"]["message"], (t, r.text)


def test_malformed_chunked_body_gets_one_answer_and_one_log_line(server):
    log_before = server.log()
    for i in range(30):
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        reply = raw_request(server.port, head + b"zz\r\nhello\r\n" if i % 2 else head + b"5\r\nhello\r\nnot-a-size\r\n", wait=3)
        assert reply.count(b"HTTP/1.1 ") == 1 and reply.split(b" ")[1] in (b"200", b"400"), reply  # one answer, never two
    time.sleep(0.3)  # anything else it would log comes now
    new = server.log()[len(log_before):]
    assert "Traceback" not in new and "LocalProtocolError" not in new and len(new.splitlines()) <= 1, new
    with server.client() as client:
        assert client.get("/health").status_code == 200


def test_tracebacks_are_logged_once_then_counted(tiny_tokenizer, caplog):
    app = create_app([Worker(gpu_id=0, engine=Engine(ScriptedModel([0], tiny_tokenizer.get_vocab_size()), tiny_tokenizer))])

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug a client can trigger")
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(30):
            r = client.get("/boom")
            assert r.status_code == 500 and r.json()["error"]["message"] == "internal error"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug a client can trigger" in caplog.text, caplog.text[-2000:]
    assert caplog.text.count("unexpected error answering GET /boom") == 1


def test_connection_burst_past_the_cap_gets_503_never_a_reset(tiny_tokenizer):
    script = tiny_tokenizer.encode(" la" * 5) + [tiny_tokenizer.encode_special("<|assistant_end|>")]
    app = create_app([Worker(gpu_id=0, engine=Engine(SlowModel(script, tiny_tokenizer.get_vocab_size()), tiny_tokenizer))],
                     max_queue=100)
    body = json.dumps({"messages": HELLO}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with serve(app, max_connections=8) as url:
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
        try:
            for s in socks:
                s.sendall(request)  # each sends its whole request at once, as a real client would
            deadline = time.time() + 60
            replies = [read_to_eof(s, deadline) for s in socks]
        finally:
            for s in socks:
                s.close()
    codes = [r.split(b" ")[1] if r.startswith(b"HTTP/1.1 ") else r[:40] for r in replies]
    assert all(c in (b"200", b"503") for c in codes), codes  # never a reset, never silence
    assert 1 <= codes.count(b"200") <= 8 and codes.count(b"200") + codes.count(b"503") == 30, codes
    for r in replies:
        if r.startswith(b"HTTP/1.1 503"):
            assert b"retry-after: 1" in r.lower() and json.loads(r.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_half_sent_bodies_do_not_lock_out_health(tiny_tokenizer):
    app = create_app([Worker(gpu_id=0, engine=Engine(ScriptedModel([0], tiny_tokenizer.get_vocab_size()), tiny_tokenizer))])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with serve(app, max_connections=8, evict_after=0.2) as url:  # bodies may take 30 s (the default) to arrive
        port = int(url.rsplit(":", 1)[1])
        uploads = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
        try:
            for s in uploads:
                s.sendall(head + b'{"messages": [')  # and the rest never comes
            time.sleep(0.4)  # past evict_after: the uploads may now be closed to make room
            for _ in range(10):
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            deadline = time.time() + 0.5  # the 503s went out before /health was answered
            replies = []
            for s in uploads:  # answered and closed, or still waiting for the rest of its body (no reset either way)
                try:
                    replies.append(read_to_eof(s, deadline))
                except socket.timeout:
                    replies.append(None)
        finally:
            for s in uploads:
                s.close()
        answered = [r for r in replies if r is not None]
        assert all(r.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in r.lower() and r.endswith(b"}") for r in answered), answered
        assert len(answered) >= 3, replies  # two past the cap when they came, one (at least) to make room for /health
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        assert stats["pending_requests"] == 0 and stats["workers"][0]["busy"] is False


def test_client_that_half_closes_after_its_request_gets_the_reply(server):
    with server.client() as client:
        greedy = client.post("/v1/chat/completions", content=owl_body(0), headers={"content-type": "application/json"}).json()
    for stream in (False, True):
        body = owl_body(0, stream=stream)
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
            s.sendall(post_head("/v1/chat/completions", len(body)) + body)
            s.shutdown(socket.SHUT_WR)  # "that is all I send": the reply must still come
            reply = read_to_eof(s, time.time() + 20)
        while reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):  # interim answers a client skips
            reply = reply[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        payload = reply.split(b"\r\n\r\n", 1)[1]
        if stream:
            # chunked: complete up to its last (empty) chunk, with every finish reason and the [DONE] record
            assert payload.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") and b'"finish_reason": "' in payload, payload[-300:]
        else:
            assert json.loads(payload)["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_two_authorization_headers_are_refused(server):
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    for second in (KEY, "wrong"):
        head = post_head("/v1/chat/completions", len(body), extra=f"Authorization: Bearer {second}\r\nConnection: close\r\n")
        reply = raw_request(server.port, head + body, wait=5)
        assert reply.startswith(b"HTTP/1.1 400") and b"more than one Authorization" in reply, reply[:300]
    assert raw_request(server.port, post_head("/v1/chat/completions", len(body), extra="Connection: close\r\n") + body,
                       wait=5).startswith(b"HTTP/1.1 200")


def test_host_port_must_be_a_port(server):
    with server.client() as client:
        for host in ("localhost:abc", f"127.0.0.1:{server.port}@evil.example", "localhost:0", "localhost:65536",
                     "localhost:", f"localhost:{server.port}:1", "local host", "[::1", "[::1]x"):
            r = client.get("/v1/models", headers={"Host": host})
            assert_clean_error(r, 400)
        for host in (f"localhost:{server.port}", "LOCALHOST", "127.0.0.1:1", f"[::1]:{server.port}"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_client_that_stops_reading_is_dropped_at_the_write_deadline(tiny_tokenizer, caplog):
    script = tiny_tokenizer.encode(" la" * 2000)
    model = SlowModel(script, tiny_tokenizer.get_vocab_size(), sequence_len=4096)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tiny_tokenizer))], max_tokens=4000)
    body = json.dumps({"messages": HELLO, "stream": True, "n": 8, "max_tokens": 3000}).encode()
    with serve(app, write_timeout=0.3) as url, httpx.Client(base_url=url, timeout=10) as client:
        port = int(url.rsplit(":", 1)[1])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill soon
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            # it reads nothing: at the deadline the server drops it, and the generation stops
            wait_for(lambda: client.get("/stats").json()["requests"] == 1, "the generation to stop", timeout=60)
        finally:
            s.close()
        stats = client.get("/stats").json()
        assert stats["tokens_generated"] < 8 * 3000 // 2 and stats["pending_requests"] == 0 and not stats["workers"][0]["busy"]
    assert caplog.text.count("read none of its reply") == 1, caplog.text[-2000:]
