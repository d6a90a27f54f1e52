"""
Serve a chat model over HTTP: a single-page chat UI, a streaming SSE endpoint and an OpenAI-compatible API.

    python -m scripts.chat_web -i sft                    # http://127.0.0.1:8000
    python -m scripts.chat_web -i sft --num-gpus 8       # one model replica per GPU

Endpoints:
    GET  /                     chat UI (no external assets: works offline)
    POST /chat/completions     {"messages": [...], "temperature", "top_k", "max_tokens", "seed"} ->
                               SSE `data: {"token": "...", "gpu": 0}` ... `data: {"done": true}`
    POST /v1/chat/completions  OpenAI chat completions (stream true/false, n, seed; top_k as an extra field)
    GET  /v1/models, /health, /stats

Each request borrows one free worker (a model replica) from an asyncio queue and generates in a thread, so
the event loop keeps serving while tokens are produced. Requests outside the limits below get a 4xx JSON
error in OpenAI's format ({"error": {"message", "type", "param", "code"}}).
"""

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.engine import Engine, StreamDecoder

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_CONVERSATION_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
N_RANGE = (1, 8)

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


class ApiError(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status, message, param=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


@dataclass
class Worker:
    gpu_id: int
    engine: Engine
    busy: bool = False
    requests: int = 0
    tokens: int = 0


class WorkerPool:
    """Free workers wait in an asyncio queue; a request takes one and gives it back when generation ends."""

    def __init__(self, workers):
        self.workers = workers
        self.queue = None
        self.waiting = 0

    def start(self):
        self.queue = asyncio.Queue()  # made inside the running loop
        for w in self.workers:
            self.queue.put_nowait(w)

    async def acquire(self):
        self.waiting += 1
        try:
            worker = await self.queue.get()
        finally:
            self.waiting -= 1
        worker.busy = True
        return worker

    def release(self, worker):
        worker.busy = False
        self.queue.put_nowait(worker)


# -----------------------------------------------------------------------------
# Request validation

def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}, got {value}", key)
    return value


def _content_text(content, i):
    """Message content as a string; OpenAI's list-of-parts form is accepted for text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string (or a list of text parts)", "messages")


def validate_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(messages)} > {MAX_MESSAGES}", "messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(400, f"messages[{i}] must be an object with role and content", "messages")
        role, text = m["role"], _content_text(m["content"], i)
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"messages[{i}] is too long: {len(text)} > {MAX_MESSAGE_CHARS} characters", "messages")
        total += len(text)
        out.append({"role": role, "content": text})
    if total > MAX_CONVERSATION_CHARS:
        raise ApiError(400, f"conversation is too long: {total} > {MAX_CONVERSATION_CHARS} characters", "messages")
    # the chat format: an optional leading system message, then user/assistant turns ending with a user turn
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ApiError(400, "messages must alternate user/assistant starting with user (a system message only first)", "messages")
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    return out


async def read_json(request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body too large: {len(body)} > {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}")
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


# -----------------------------------------------------------------------------
# Generation

def create_app(workers, model_name="nanochat", temperature=0.8, top_k=50, max_tokens=512):
    """The FastAPI app around a list of Workers (one model replica each); defaults apply when a request omits them."""
    pool = WorkerPool(workers)
    tokenizer = workers[0].engine.tokenizer
    context_len = workers[0].engine.model.config.sequence_len
    stats = {"started": time.time(), "requests": 0, "tokens": 0, "first_token_s": deque(maxlen=100)}

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def parse(body, openai):
        messages = validate_messages(body.get("messages"))
        params = dict(
            temperature=float(_number(body, "temperature", temperature, *TEMPERATURE_RANGE)),
            top_k=_number(body, "top_k", top_k, *TOP_K_RANGE, integer=True),
            max_tokens=_number(body, "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens",
                               max_tokens, *MAX_TOKENS_RANGE, integer=True),
            n=_number(body, "n", 1, *N_RANGE, integer=True) if openai else 1,
            seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
        )
        if params["seed"] is None:
            params["seed"] = random.randrange(2**31)
        tokens = tokenizer.render_for_completion({"messages": messages})
        if len(tokens) >= context_len:
            raise ApiError(400, f"conversation is {len(tokens)} tokens; the model's context holds {context_len}", "messages")
        params["max_tokens"] = min(params["max_tokens"], context_len - len(tokens))
        return tokens, params

    async def generate(tokens, n, temperature, top_k, max_tokens, seed):
        """Async stream of events: ("start", worker) then ("text", row, str) / ("finish", row, reason, count)."""
        t0 = time.perf_counter()  # first-token latency counts the wait for a free worker
        worker = await pool.acquire()
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        stop = threading.Event()

        def emit(*event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        def finish(num_tokens):  # on the event loop: bookkeeping, then the worker is free again
            worker.requests += 1
            worker.tokens += num_tokens
            stats["requests"] += 1
            stats["tokens"] += num_tokens
            pool.release(worker)

        def run():
            device = worker.engine.model.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)  # this thread's kernels go to the worker's own GPU
            decoders = [StreamDecoder(tokenizer) for _ in range(n)]
            finished, counts = [False] * n, [0] * n
            try:
                for column, _ in worker.engine.generate(tokens, num_samples=n, max_tokens=max_tokens,
                                                        temperature=temperature, top_k=top_k, seed=seed):
                    if stop.is_set():
                        break
                    for row, token in enumerate(column):
                        if finished[row]:
                            continue
                        if token in worker.engine.stop_tokens:
                            finished[row] = True
                            emit("text", row, decoders[row].flush())
                            emit("finish", row, "stop", counts[row])
                            continue
                        counts[row] += 1
                        emit("text", row, decoders[row].push(token))
                    if all(finished):
                        break
                for row in range(n):
                    if not finished[row]:
                        emit("text", row, decoders[row].flush())
                        emit("finish", row, "length", counts[row])
            except Exception as e:  # reported to the client; the server carries on
                emit("error", f"{type(e).__name__}: {e}")
            finally:
                loop.call_soon_threadsafe(finish, sum(counts))
                emit("end")

        threading.Thread(target=run, daemon=True).start()
        try:
            yield ("start", worker)
            first = True
            while True:
                event = await events.get()
                if event[0] == "end":
                    return
                if event[0] == "text" and not event[2]:
                    continue
                if first and event[0] == "text":
                    stats["first_token_s"].append(time.perf_counter() - t0)
                    first = False
                yield event
        finally:
            stop.set()  # client gone or stream done: the thread stops at its next step and frees the worker

    @app.get("/")
    async def index():
        with open(UI_PATH, encoding="utf-8") as f:
            html = f.read()
        defaults = json.dumps({"temperature": temperature, "top_k": top_k})
        start, end = html.index("/*DEFAULTS*/"), html.index("/*END*/") + len("/*END*/")
        return HTMLResponse(html[:start] + defaults + html[end:])

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": pool.queue is not None, "workers": len(workers),
                "free_workers": pool.queue.qsize() if pool.queue else 0}

    @app.get("/stats")
    async def get_stats():
        ftl = stats["first_token_s"]  # the last 100 requests
        return {
            "uptime_s": round(time.time() - stats["started"], 1),
            "requests": stats["requests"],
            "tokens_generated": stats["tokens"],
            "waiting_requests": pool.waiting,
            "mean_first_token_latency_s": round(sum(ftl) / len(ftl), 4) if ftl else None,
            "workers": [{"gpu": w.gpu_id, "busy": w.busy, "requests": w.requests, "tokens": w.tokens} for w in workers],
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(stats["started"]), "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        tokens, p = parse(await read_json(request), openai=False)

        async def sse():
            gpu = None
            async for event in generate(tokens, **p):
                if event[0] == "start":
                    gpu = event[1].gpu_id
                elif event[0] == "text":
                    yield f"data: {json.dumps({'token': event[2], 'gpu': gpu})}\n\n"
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': event[1]})}\n\n"
            yield f"data: {json.dumps({'done': True})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        body = await read_json(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream")
        tokens, p = parse(body, openai=True)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        header = {"id": completion_id, "created": created, "model": model_name}

        if not stream:
            texts, reasons, counts = [""] * p["n"], ["stop"] * p["n"], [0] * p["n"]
            async for event in generate(tokens, **p):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    reasons[event[1]], counts[event[1]] = event[2], event[3]
                elif event[0] == "error":
                    raise ApiError(500, f"generation failed: {event[1]}")
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            usage = {"prompt_tokens": len(tokens), "completion_tokens": sum(counts), "total_tokens": len(tokens) + sum(counts)}
            return {**header, "object": "chat.completion", "choices": choices, "usage": usage}

        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(choices, **extra):
            return f"data: {json.dumps({**header, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        async def sse():
            completion_tokens = 0
            async for event in generate(tokens, **p):
                if event[0] == "start":
                    for i in range(p["n"]):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                elif event[0] == "text":
                    yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                elif event[0] == "finish":
                    completion_tokens += event[3]
                    yield chunk([{"index": event[1], "delta": {}, "finish_reason": event[2]}])
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            if include_usage:
                usage = {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
                         "total_tokens": len(tokens) + completion_tokens}
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main():
    parser = argparse.ArgumentParser(description="Serve a nanochat model: web UI, SSE and OpenAI-compatible API")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to serve")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag (default: the latest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU: always 1)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="bind address (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--temperature", type=float, default=0.8, help="default sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("--max-tokens", type=int, default=512, help="default maximum tokens per reply")
    args = parser.parse_args()

    import uvicorn
    from nanochat.checkpoint import load_model
    from nanochat.common import autodetect_device_type

    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        assert args.num_gpus <= torch.cuda.device_count(), f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs visible"
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        devices = [torch.device(device_type)]
    workers, meta = [], None
    for i, device in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        workers.append(Worker(gpu_id=i, engine=Engine(model, tokenizer)))
        print(f"worker {i}: {args.source}/{meta['model_tag']} step {meta['step']} on {device}", flush=True)
    model_name = f"nanochat-{args.source}-{meta['model_tag']}"
    app = create_app(workers, model_name=model_name, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    print(f"serving {model_name} at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
