"""
Serve a chat model over HTTP: a single-page chat UI, a streaming SSE endpoint and an OpenAI-compatible API.

    python -m scripts.chat_web -i sft                    # http://127.0.0.1:8000
    python -m scripts.chat_web -i sft --num-gpus 8       # one model replica per GPU
    NANOCHAT_API_KEY=... python -m scripts.chat_web -i sft --host 0.0.0.0 --allowed-hosts chat.example.org

Endpoints:
    GET  /                     chat UI (no external assets: works offline)
    POST /chat/completions     {"messages": [...], "temperature", "top_k", "max_tokens", "seed"} ->
                               SSE `data: {"token": "...", "gpu": 0}` ... `data: {"done": true}`
    POST /v1/chat/completions  OpenAI chat completions: stream (with stream_options.include_usage), n, seed, stop,
                               logprobs/top_logprobs, max_(completion_)tokens; top_k as an extra field. Fields it
                               cannot honour (tools, response_format, top_p, ...) are a 400 naming the field unless
                               set to their "off" value; unknown fields are a 400 too, as with OpenAI.
    GET  /v1/models, /health, /stats

Each request borrows one free worker (a model replica) from an asyncio queue and generates in a thread, so
the event loop keeps serving while tokens are produced. A tool call in a reply shows as its result (the
calculator's answer), never as control tokens, and only sampled tokens count as completion tokens.

Hostile clients: every request is checked before the app reads it (Host header against the bind address
and --allowed-hosts, which defeats DNS rebinding; `Authorization: Bearer` with --api-key on every route but
/health; POSTs must be application/json, and a Content-Length over the limit is refused unread), bodies are
read up to the limit and within a deadline, each connection has a deadline for its request head, open
connections are capped (at the cap one waiting for its head, or stalled sending its body or reading its reply,
makes room), whoever is turned away gets a 503 with Retry-After and a lingering close (never a TCP reset), a
reply nobody reads is dropped after --write-timeout, the queue for workers is bounded (503 with Retry-After
beyond it), and a client that goes away stops its generation (one that only half-closes still gets its reply).
Errors are 4xx JSON in OpenAI's format ({"error": {"message", "type", "param", "code"}}); a 500 says only
"internal error". Repeated events, tracebacks included (connections refused or timed out, uploads abandoned,
a bug a request sets off), are logged once, then counted: no client can make the log grow without bound.
"""

import argparse
import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import os
import random
import re
import resource
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.decode import for_inference
from nanochat.engine import Engine, StreamDecoder
from nanochat.gpt import check_sampling
from nanochat.stage import STAGE_NAMES

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_CONVERSATION_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
N_RANGE = (1, 8)
TOP_LOGPROBS_RANGE = (0, 20)
MAX_STOPS, MAX_STOP_CHARS = 4, 200
# OpenAI chat completion fields: those honoured, those that change nothing in a reply (accepted and ignored), and
# those not supported, accepted only at the value that means "off" (any other value is a 400 naming the field)
OPENAI_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_k", "n", "seed", "stop",
                 "stream", "stream_options", "logprobs", "top_logprobs"}
OPENAI_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
OPENAI_OFF = {"tools": [[]], "tool_choice": ["none"], "functions": [[]], "function_call": ["none"],
              "parallel_tool_calls": [True, False], "response_format": [{"type": "text"}], "top_p": [1],
              "frequency_penalty": [0], "presence_penalty": [0], "logit_bias": [{}], "modalities": [["text"]],
              "audio": [], "prediction": [], "reasoning_effort": [], "verbosity": [], "web_search_options": []}
MAX_QUEUE = 64  # requests waiting for a worker; more get 503
RETRY_AFTER_S = 1
MAX_CONNECTIONS = 256
HEADER_TIMEOUT_S = 10.0  # from connect (or the last response) to a complete request head
BODY_TIMEOUT_S = 30.0  # to receive a whole request body
WRITE_TIMEOUT_S = 30.0  # a reply the client reads none of for this long is abandoned
EVICT_AFTER_S = 1.0  # at the connection cap, a body this slow to come, or a reply unread this long, makes room
LINGER_S = 2.0  # after a 503 and FIN, how long a client's further input is read and dropped (no reset)
SEND_BUFFER_BYTES = 64 << 10  # kernel send buffer per connection (Linux doubles it); not auto-tuned to megabytes
PROBE_S = 0.25  # after a FIN with a request in progress: first check that the client is still there
MAX_LINGERING = 1024  # connections in such a lingering close at once; past it they are closed at once
KEEP_ALIVE_S = 5  # idle time between requests on one connection
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
log = logging.getLogger("nanochat.web")


class ApiError(Exception):
    def __init__(self, status, message, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


class ClientGone(Exception):
    """The client disconnected before its request was read: there is no one to answer."""


def error_body(status, message, param=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status, message, param=None, headers=None):
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class Throttled:
    """Logs an event's first occurrence, then at most one line per interval saying how many more there were.
    Keys come from code (a message template, an exception type and where it was raised), never from clients,
    so the table stays small; a traceback is written with the first of its kind in each interval only."""

    def __init__(self, interval=60.0):
        self.interval, self.state, self.lock = interval, {}, threading.Lock()  # generation threads log too

    def __call__(self, key, message, level=logging.WARNING, exc_info=None):
        now = time.monotonic()
        with self.lock:
            last, count = self.state.get(key, (None, 0))
            due = last is None or now - last >= self.interval
            self.state[key] = (now, 0) if due else (last, count + 1)
        if due:
            log.log(level, message + (f" (and {count} more like it since the last report)" if count else ""),
                    exc_info=exc_info)


events = Throttled()


def _exception_key(exc_info):
    """An exception's type and the line that raised it: one key per bug, however often a client triggers it."""
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return type(exc).__name__, where


class ThrottleRepeats(logging.Filter):
    """For uvicorn's logger, which logs once per occurrence (e.g. "Invalid HTTP request received.", or
    "Exception in ASGI application" with a traceback): each record goes through `events` instead, so no
    request, authenticated or not, can make the log grow without bound."""

    def filter(self, record):
        message = record.getMessage().strip()
        key = ("uvicorn", str(record.msg)) + (_exception_key(record.exc_info) if record.exc_info else ())
        events(key, f"uvicorn: {message}", record.levelno, record.exc_info)
        return False


@dataclass
class Worker:
    gpu_id: int
    engine: Engine
    busy: bool = False
    requests: int = 0
    tokens: int = 0


class WorkerPool:
    """Free workers wait in an asyncio queue; a request takes one and gives it back when generation ends.
    Requests are admitted only while fewer than len(workers) + max_queue are in progress."""

    def __init__(self, workers, max_queue=MAX_QUEUE):
        self.workers, self.max_queue = workers, max_queue
        self.queue = None
        self.waiting = 0  # admitted requests waiting for a worker
        self.pending = 0  # admitted requests not finished
        self.refused = 0

    def start(self):
        self.queue = asyncio.Queue()  # made inside the running loop
        for w in self.workers:
            self.queue.put_nowait(w)

    def admit(self):
        """A place for one request, or a 503; returns the function that gives the place back (idempotent)."""
        if self.pending >= len(self.workers) + self.max_queue:
            self.refused += 1
            events("busy", f"queue full ({self.max_queue} waiting): requests refused with 503")
            raise ApiError(503, f"server busy: {self.max_queue} requests are already waiting; retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.pending += 1
        released = []

        def release():
            if not released:
                released.append(True)
                self.pending -= 1
        return release

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


class ReplyRenderer:
    """A reply's tokens as the text a user sees. A python tool call shows as its result: the call
    (<|python_start|>7+5<|python_end|>) is hidden and the forced output (<|output_start|>12<|output_end|>)
    reads as "12"; no control token is ever shown. UTF-8 characters are never split (StreamDecoder)."""

    def __init__(self, engine):
        self.engine = engine
        self.decoder = StreamDecoder(engine.tokenizer)
        self.control = set(engine.tokenizer.special_tokens.values())
        self.in_call = False

    def push(self, token):
        if token == self.engine.python_start:
            self.in_call = True
            return self.decoder.flush()
        if token == self.engine.python_end:
            self.in_call = False
            return ""
        if self.in_call:
            return ""
        if token in self.control:
            return self.decoder.flush()
        return self.decoder.push(token)

    def flush(self):
        return self.decoder.flush()


class StopText:
    """Cuts a reply at the first of its stop sequences (the sequence itself is not part of the reply, as with
    OpenAI). Text that could be the start of one is held back until the next piece shows whether it is."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, text):
        """-> (text to release, whether a stop sequence was found)."""
        if not self.stops:
            return text, False
        text = self.held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class ReleasingStream(StreamingResponse):
    """A streamed reply that gives its queue place back however it ends: finished, client gone, never started."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()

# -----------------------------------------------------------------------------
# Request validation

def _brief(value):
    """A client's value, short, for an error message (never a huge repr, never int-to-str beyond its limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {_brief(value)}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}, got {_brief(value)}", key)
    return value


def _check_openai_fields(body):
    """OpenAI answers a field it does not know with a 400, and so does this server: a client must never believe
    that `tools` or `response_format` were honoured when they were ignored."""
    for key, value in body.items():
        if key in OPENAI_FIELDS or key in OPENAI_IGNORED:
            continue
        if key not in OPENAI_OFF:
            raise ApiError(400, f"unrecognized request argument: {_brief(key)}", key[:40])
        if value is not None and value not in OPENAI_OFF[key]:
            raise ApiError(400, f"{key} is not supported by this server (got {_brief(value)})", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {_brief(model)}", "model")


def _stops(stop):
    """OpenAI's `stop`: null, a string, or a list of up to 4 strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stops):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings, each of 1 to "
                            f"{MAX_STOP_CHARS} characters; got {_brief(stop)}", "stop")
    return stops


def _logprobs(body):
    """None (no log-probabilities) or how many alternatives to report per token (top_logprobs, 0 to 20)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, f"logprobs must be true or false, got {_brief(wanted)}", "logprobs")
    top = _number(body, "top_logprobs", None, *TOP_LOGPROBS_RANGE, integer=True)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


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
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {_brief(role)}", "messages")
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


async def _read_body(request, limit):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # stop reading here: the rest is never buffered
            raise ApiError(413, f"request body too large: over {limit} bytes", headers={"Connection": "close"})
    return bytes(body)


async def read_json(request, timeout=BODY_TIMEOUT_S):
    """The request's JSON object: the body is read up to MAX_BODY_BYTES and within `timeout` seconds."""
    try:
        body = await asyncio.wait_for(_read_body(request, MAX_BODY_BYTES), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s", headers={"Connection": "close"})
    except ClientDisconnect:
        client = request.client
        events("upload", f"client {client.host}:{client.port} disconnected while sending its request; dropped" if client
               else "a client disconnected while sending its request; dropped")
        raise ClientGone()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})")
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON: the body is not UTF-8 text")
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply")
    except ValueError:  # an integer literal past Python's digit limit
        raise ApiError(400, "malformed JSON: a number is too long")
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


async def _disconnected(request):
    """Returns when the client goes away (the body has been read: uvicorn's receive() then waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


HOST_HEADER = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+))(?::([0-9]{1,5}))?")


def _host_name(header):
    """'example.org:8000' -> 'example.org', '[::1]:8000' -> '::1'; None unless the header is exactly a host and an
    optional port from 1 to 65535 ('localhost:abc' and '127.0.0.1:80@evil.example' are not)."""
    m = HOST_HEADER.fullmatch(header)
    if m is None or (m[3] is not None and not 0 < int(m[3]) < 65536):
        return None
    return (m[1] or m[2]).lower()


def _is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Gate:
    """Pure ASGI middleware: checks the headers of every HTTP request before the app reads anything."""

    def __init__(self, app, host, allowed_hosts, api_key):
        self.app, self.api_key = app, api_key
        self.any_ip = host in ("0.0.0.0", "::", "")  # serving every address: any IP literal is one of ours
        self.hosts = {h.lower().strip("[]") for h in (*LOCAL_HOSTS, *([] if self.any_ip else [host]), *allowed_hosts)}

    def problem(self, scope, headers):
        names = [k for k, _ in scope["headers"]]
        for name in (b"host", b"authorization", b"content-type", b"content-length"):
            if names.count(name) > 1:  # which one counts would be up to each proxy and parser: refuse them all
                return 400, f"more than one {name.decode().title()} header: send it once", {}
        host = headers.get("host")
        if host is not None:
            name = _host_name(host)
            if name is None:
                return 400, f"Host {_brief(host)} is not a host name with an optional port", {}
            if name not in self.hosts and not (self.any_ip and _is_ip(name)):
                return 400, f"Host {_brief(host)} is not served here (start the server with --allowed-hosts to add it)", {}
        if self.api_key and scope["path"] != "/health":
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return 401, "missing or wrong API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
        if scope["method"] == "POST":
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return 415, "Content-Type must be application/json", {}
            length = headers.get("content-length")
            if length is not None:
                if not (length.isascii() and length.isdigit()):
                    return 400, "Content-Length must be a number of bytes", {}
                if len(length.lstrip("0")) > 9 or int(length) > MAX_BODY_BYTES:  # never int() a huge string
                    return 413, f"request body too large: {_brief(length)} > {MAX_BODY_BYTES} bytes", {}
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.problem(scope, headers)
        if problem is not None:
            status, message, extra = problem
            # the body, if any, is never read: the connection closes after the answer
            response = error_response(status, message, headers={**extra, "Connection": "close"})
            return await response(scope, receive, send)
        started = []

        async def tracked_send(message):
            started.append(True)
            await send(message)
        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:  # a bug: its traceback once per interval, a plain 500 for the client
            if started:
                raise  # a reply is under way: uvicorn can only close the connection
            events(("app",) + _exception_key(e), f"unexpected error answering {scope['method']} {scope['path'][:100]}",
                   logging.ERROR, e)
            await error_response(500, "internal error")(scope, receive, send)

# -----------------------------------------------------------------------------
# Generation

def create_app(workers, model_name="nanochat", temperature=0.8, top_k=50, max_tokens=512, max_queue=MAX_QUEUE,
               api_key=None, host="127.0.0.1", allowed_hosts=(), body_timeout=BODY_TIMEOUT_S):
    """The FastAPI app around a list of Workers (one model replica each); defaults apply when a request omits
    them. host is the bind address, which Host headers may name besides localhost and allowed_hosts."""
    pool = WorkerPool(workers, max_queue)
    tokenizer = workers[0].engine.tokenizer
    context_len = workers[0].engine.model.config.sequence_len
    stats = {"started": time.time(), "requests": 0, "tokens": 0, "first_token_s": deque(maxlen=100)}

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        loop = asyncio.get_running_loop()

        def on_loop_error(loop, context):  # e.g. accept() failing with EMFILE: asyncio would log every retry
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                events("fds", f"cannot accept connections: {exc.strerror}")
            else:  # anything else a client could set off again and again: once per interval, with its traceback
                message = context.get("message", "error in the event loop")
                key = ("loop", message) + (_exception_key(exc) if exc is not None else ())
                events(key, f"asyncio: {message}", logging.ERROR, exc)
        loop.set_exception_handler(on_loop_error)
        yield

    # no /docs, /redoc or /openapi.json: the docs pages load their scripts from a CDN
    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, host=host, allowed_hosts=allowed_hosts, api_key=api_key)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc):  # 404, 405
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request, exc):
        return Response(status_code=400)  # nobody reads it

    def parse(body, openai):
        if openai:
            _check_openai_fields(body)
        messages = validate_messages(body.get("messages"))
        params = dict(
            temperature=float(_number(body, "temperature", temperature, *TEMPERATURE_RANGE)),
            top_k=_number(body, "top_k", top_k, *TOP_K_RANGE, integer=True),
            max_tokens=_number(body, "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens",
                               max_tokens, *MAX_TOKENS_RANGE, integer=True),
            n=_number(body, "n", 1, *N_RANGE, integer=True) if openai else 1,
            seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
            stop=_stops(body.get("stop")) if openai else [],
            logprobs=_logprobs(body) if openai else None,
        )
        if params["seed"] is None:
            params["seed"] = random.randrange(2**31)
        tokens = tokenizer.render_for_completion({"messages": messages})
        if len(tokens) >= context_len:
            raise ApiError(400, f"conversation is {len(tokens)} tokens; the model's context holds {context_len}", "messages")
        params["max_tokens"] = min(params["max_tokens"], context_len - len(tokens))
        return tokens, params

    def token_info(token, logprob):
        return {"token": tokenizer.decode([token]), "logprob": max(logprob, -9999.0),  # never -inf: JSON has none
                "bytes": list(tokenizer.enc.decode_single_token_bytes(token))}

    async def generate(tokens, n, temperature, top_k, max_tokens, seed, stop=(), logprobs=None):
        """Async stream of events: ("start", worker) then ("text", row, str, logprob entries) and
        ("finish", row, reason, count) per row; ("error", message) if generation fails."""
        t0 = time.perf_counter()  # first-token latency counts the wait for a free worker
        worker = await pool.acquire()
        loop = asyncio.get_running_loop()
        events_q = asyncio.Queue()
        stop_event = threading.Event()

        def emit(*event):
            loop.call_soon_threadsafe(events_q.put_nowait, event)

        def finish(num_tokens):  # on the event loop: bookkeeping, then the worker is free again
            worker.requests += 1
            worker.tokens += num_tokens
            stats["requests"] += 1
            stats["tokens"] += num_tokens
            pool.release(worker)

        def run():
            engine = worker.engine
            device = engine.model.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)  # this thread's kernels go to the worker's own GPU
            renderers = [ReplyRenderer(engine) for _ in range(n)]
            stoppers = [StopText(stop) for _ in range(n)]
            finished, counts = [False] * n, [0] * n

            def end_row(row, reason):  # the held-back text goes out, unless it completes a stop sequence
                text, stopped = stoppers[row].push(renderers[row].flush())
                finished[row] = True
                emit("text", row, text if stopped else text + stoppers[row].flush(), [])
                emit("finish", row, "stop" if stopped else reason, counts[row])

            try:
                for step in engine.generate(tokens, num_samples=n, max_tokens=max_tokens, temperature=temperature,
                                            top_k=top_k, seed=seed, logprobs=logprobs):
                    if stop_event.is_set():
                        break
                    column, masks = step[0], step[1]
                    for row, (token, sampled) in enumerate(zip(column, masks)):
                        if finished[row]:
                            continue
                        if token in engine.stop_tokens:
                            end_row(row, "stop")
                            continue
                        counts[row] += sampled  # a tool's forced output is not generated
                        renderer = renderers[row]
                        piece = renderer.push(token)
                        entries = []
                        if logprobs is not None and sampled and token not in renderer.control and not renderer.in_call:
                            logprob, top = step[2][row]
                            entries = [{**token_info(token, logprob), "top_logprobs": [token_info(t, v) for t, v in top]}]
                        text, stopped = stoppers[row].push(piece)
                        emit("text", row, text, entries)
                        if stopped:
                            finished[row] = True
                            emit("finish", row, "stop", counts[row])
                    if all(finished):
                        break
                for row in range(n):
                    if not finished[row]:
                        end_row(row, "length")
            except Exception as e:  # the client hears that it failed; the details stay in the server's log
                events(("generation",) + _exception_key(e), "generation failed", logging.ERROR, e)
                emit("error", "generation failed")
            finally:
                loop.call_soon_threadsafe(finish, sum(counts))
                emit("end")

        threading.Thread(target=run, daemon=True).start()
        try:
            yield ("start", worker)
            first = True
            while True:
                event = await events_q.get()
                if event[0] == "end":
                    return
                if event[0] == "text" and not event[2] and not event[3]:
                    continue
                if first and event[0] == "text" and event[2]:
                    stats["first_token_s"].append(time.perf_counter() - t0)
                    first = False
                yield event
        finally:
            stop_event.set()  # client gone or stream done: the thread stops at its next step and frees the worker

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
            "pending_requests": pool.pending,
            "refused_busy": pool.refused,
            "mean_first_token_latency_s": round(sum(ftl) / len(ftl), 4) if ftl else None,
            "workers": [{"gpu": w.gpu_id, "busy": w.busy, "requests": w.requests, "tokens": w.tokens} for w in workers],
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(stats["started"]), "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        tokens, p = parse(await read_json(request, body_timeout), openai=False)
        release = pool.admit()

        async def sse():
            gpu = None
            async with aclosing(generate(tokens, **p)) as stream:
                async for event in stream:
                    if event[0] == "start":
                        gpu = event[1].gpu_id
                    elif event[0] == "text" and event[2]:
                        yield f"data: {json.dumps({'token': event[2], 'gpu': gpu})}\n\n"
                    elif event[0] == "error":
                        yield f"data: {json.dumps({'error': event[1]})}\n\n"
            yield f"data: {json.dumps({'done': True})}\n\n"

        return ReleasingStream(sse(), release, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        body = await read_json(request, body_timeout)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream")
        tokens, p = parse(body, openai=True)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = options.get("include_usage") is True
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        header = {"id": completion_id, "created": created, "model": model_name}
        release = pool.admit()

        if not stream:
            texts, reasons, counts, failed = [""] * p["n"], ["stop"] * p["n"], [0] * p["n"], []
            logprobs = [[] for _ in range(p["n"])]

            async def collect():
                async with aclosing(generate(tokens, **p)) as events_:
                    async for event in events_:
                        if event[0] == "text":
                            texts[event[1]] += event[2]
                            logprobs[event[1]] += event[3]
                        elif event[0] == "finish":
                            reasons[event[1]], counts[event[1]] = event[2], event[3]
                        elif event[0] == "error":
                            failed.append(event[1])

            # a client that leaves stops its generation here too (a stream notices when its write fails)
            collector, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not collector.done():
                    collector.cancel()
                release()
            if not collector.done() or collector.cancelled():
                return Response(status_code=499)  # the client is gone: nobody reads it
            collector.result()
            if failed:
                raise ApiError(500, "generation failed")
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None if p["logprobs"] is None else {"content": lp, "refusal": None}}
                       for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
            usage = {"prompt_tokens": len(tokens), "completion_tokens": sum(counts), "total_tokens": len(tokens) + sum(counts)}
            return {**header, "object": "chat.completion", "choices": choices, "usage": usage}


        def chunk(choices, **extra):
            return f"data: {json.dumps({**header, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        async def sse():
            completion_tokens = 0
            async with aclosing(generate(tokens, **p)) as stream_:
                async for event in stream_:
                    if event[0] == "start":
                        for i in range(p["n"]):
                            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                    elif event[0] == "text":
                        lp = None if p["logprobs"] is None else {"content": event[3], "refusal": None}
                        yield chunk([{"index": event[1], "delta": {"content": event[2]}, "logprobs": lp, "finish_reason": None}])
                    elif event[0] == "finish":
                        completion_tokens += event[3]
                        yield chunk([{"index": event[1], "delta": {}, "finish_reason": event[2]}])
                    elif event[0] == "error":
                        yield f"data: {json.dumps(error_body(500, event[1]))}\n\n"
            if include_usage:
                usage = {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
                         "total_tokens": len(tokens) + completion_tokens}
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return ReleasingStream(sse(), release, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app

# -----------------------------------------------------------------------------
# The HTTP server: uvicorn, with a deadline for request heads and a cap on connections

BUSY = json.dumps(error_body(503, "too many connections; retry later")).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: %d\r\n"
                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (RETRY_AFTER_S, len(BUSY), BUSY))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, hardened against clients that hold connections without using them:
    - a request head must arrive within header_timeout of the connection (or of the previous response);
    - at most max_connections are open. At the cap, the connection stalled longest makes room: one waiting for a
      request head (it has asked nothing yet), or one stalled for evict_after seconds sending its body or not
      reading its reply. A request being served is never closed. If none may go, the newcomer is refused;
    - whoever is refused, or closed before being answered, gets a 503 with Retry-After and a lingering close (FIN,
      then what it still sends is read and dropped for up to LINGER_S): closing a socket with unread input sends
      a TCP reset, and a reset can destroy the 503 before the client reads it;
    - a reply the client stops reading for write_timeout seconds is abandoned (its generation stops);
    - a client that half-closes after its request still gets its reply;
    - when uvicorn answers a request that breaks HTTP with a 400 itself, the app's answer goes nowhere (h11 would
      raise on a second one).
    Settings are class attributes (see make_server)."""
    max_connections = MAX_CONNECTIONS
    header_timeout = HEADER_TIMEOUT_S
    write_timeout = WRITE_TIMEOUT_S
    evict_after = EVICT_AFTER_S
    lingering = 0  # connections of this server in a lingering close (counted on the class make_server creates)
    lingered = counted = False
    head_timer = write_timer = linger_timer = probe_timer = None
    idle_since = request_since = paused_since = None
    seen_cycle = None

    def connection_made(self, transport):
        if len(self.connections) >= self.max_connections and not self._make_room():
            self.transport = transport
            events("connections", f"{self.max_connections} connections open, all being served: new ones refused with 503")
            self._linger(BUSY_RESPONSE)
            return
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # replies are small and slow: a bounded kernel buffer, so a stalled reader is seen soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._arm_head_timer()

    def stalled_since(self):
        """(since when, whether it waits for a request head) for a connection holding its place without being
        served; None while it is served."""
        if self.lingered or self.transport.is_closing():
            return None
        if self.paused_since is not None:
            return self.paused_since, False  # the client is not reading its reply
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return self.idle_since, True
        if not cycle.response_started and self.conn.their_state is h11.SEND_BODY:
            return self.request_since, False  # the body is still coming
        return None

    def _make_room(self):
        now, stalled = time.monotonic(), []
        for c in self.connections:
            found = c.stalled_since() if isinstance(c, GuardedH11Protocol) else None
            if found is not None and (found[1] or now - found[0] >= self.evict_after):
                stalled.append((found[0], c))
        if not stalled:
            return False
        victim = min(stalled, key=lambda x: x[0])[1]
        events("evicted", f"{self.max_connections} connections open: closing the longest stalled to admit new ones")
        if victim.cycle is not None and victim.cycle.response_started and not victim.cycle.response_complete:
            victim._abort()  # it stopped reading a reply under way: nothing more can be said to it
        else:
            victim._linger(BUSY_RESPONSE)
        return True

    def _cancel_timers(self):
        for timer in (self.head_timer, self.write_timer, self.probe_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.write_timer = self.probe_timer = None

    def _client_gone(self):
        """The app hears that the client left: a body read ends, a reply's writes go nowhere."""
        self.connections.discard(self)  # its place is free from now on
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.flow is not None:
            self.flow.resume_writing()  # a reply waiting to write wakes up and sees it

    def _linger(self, reply=b""):
        """Send `reply` (or nothing), then FIN; read and drop input until the client closes or LINGER_S pass."""
        self.lingered = True
        self._cancel_timers()
        self._client_gone()
        transport = self.transport
        transport.write(reply)
        if type(self).lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()  # too many lingering already: plain close (the reply is still flushed first)
            return
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (e.g. it reset the connection)
            transport.abort()
            return
        type(self).lingering += 1
        self.counted = True
        transport.resume_reading()
        self.linger_timer = self.loop.call_later(LINGER_S, transport.close)

    def _abort(self):
        self._cancel_timers()
        self._client_gone()
        self.transport.abort()

    def data_received(self, data):
        if self.lingered:
            return  # read and dropped: only the FIN matters now
        super().data_received(data)
        if self.cycle is not self.seen_cycle:  # a new request head
            self.seen_cycle, self.request_since = self.cycle, time.monotonic()

    def eof_received(self):
        cycle = self.cycle
        if not self.lingered and cycle is not None and not cycle.response_complete and self.conn.their_state is h11.DONE:
            cycle.keep_alive = False  # a FIN after a whole request: answer it, then close
            self._probe(PROBE_S)
            return True
        return None  # asyncio closes the transport

    def _probe(self, interval):
        """A FIN is a half-close (the client still waits for its reply) or a client gone for good; only a write tells
        them apart: an interim '100 Continue', which clients must accept and skip, is answered by a reset from a
        closed socket. Repeated, less and less often, until the reply starts (a reply's own writes tell then)."""
        self.probe_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_started:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._abort()  # the last probe was reset: nobody will read the reply
            return
        if self.conn.their_http_version != b"1.1":
            return  # HTTP/1.0 has no interim responses: its reply tells
        try:
            self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        except h11.LocalProtocolError:
            return
        self.probe_timer = self.loop.call_later(interval, self._probe, min(2 * interval, 4.0))

    def send_400_response(self, msg):
        # uvicorn answers a request that broke HTTP (e.g. a malformed chunk) even while the app handles it
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's own reply goes nowhere
            self.cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            super().send_400_response(msg)
        else:  # a reply is under way or done: a second status line would be a protocol error
            self.transport.close()

    def pause_writing(self):
        super().pause_writing()
        self.paused_since = time.monotonic()
        self.write_timer = self.loop.call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self):
        super().resume_writing()
        self.paused_since = None
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _write_timed_out(self):
        self.write_timer = None
        events("write-timeout", f"closed connections whose client read none of its reply for {self.write_timeout:g} s")
        self._abort()

    def _arm_head_timer(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.idle_since = time.monotonic()
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _head_timeout(self):
        self.head_timer = None
        cycle = self.cycle
        if self.lingered or self.transport.is_closing() or (cycle is not None and not cycle.response_complete) \
                or self.conn.their_state is not h11.IDLE:
            return  # closing, or a request is in progress
        events("head-timeout", f"closed connections that sent no complete request within {self.header_timeout:g} s")
        self._linger()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc):
        self._cancel_timers()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        if self.counted:
            type(self).lingering -= 1
            self.counted = False
        super().connection_lost(exc)


def make_server(app, host="127.0.0.1", port=8000, max_connections=MAX_CONNECTIONS, header_timeout=HEADER_TIMEOUT_S,
                write_timeout=WRITE_TIMEOUT_S, evict_after=EVICT_AFTER_S):
    """A uvicorn.Server for `app` with the limits above; run it with server.run(sockets=[bound_socket])."""
    import uvicorn
    protocol = type("Protocol", (GuardedH11Protocol,), {"max_connections": max_connections, "header_timeout": header_timeout,
                                                        "write_timeout": write_timeout, "evict_after": evict_after})
    config = uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_S, log_level="warning")
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ThrottleRepeats) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(ThrottleRepeats())
    return uvicorn.Server(config)


def bind(host, port, backlog=2048):
    """A listening TCP socket (port 0: any free port): connections queue from here on, until uvicorn accepts them."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then (else 40 ms per reply)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def raise_open_files_limit():
    """The soft RLIMIT_NOFILE raised to the hard one: every connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def main():
    parser = argparse.ArgumentParser(description="Serve a nanochat model: web UI, SSE and OpenAI-compatible API")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=STAGE_NAMES, help="which stage's checkpoint to serve")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag (default: the latest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU: always 1)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="bind address (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the URL is printed)")
    parser.add_argument("--temperature", type=float, default=0.8, help="default sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("--max-tokens", type=int, default=512, help="default maximum tokens per reply")
    parser.add_argument("--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require `Authorization: Bearer KEY` on every route but /health (default: $NANOCHAT_API_KEY)")
    parser.add_argument("--allowed-hosts", type=str, default="",
                        help="comma-separated host names clients may use besides the bind address and localhost")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait for a worker; more get 503")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="open connections at most")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S, help="seconds for a request head to arrive")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, help="seconds for a request body to arrive")
    parser.add_argument("--write-timeout", type=float, default=WRITE_TIMEOUT_S,
                        help="seconds a client may read none of its reply before it is dropped")
    args = parser.parse_args()

    from nanochat.checkpoint import load_model
    from nanochat.common import autodetect_device_type

    open_files = raise_open_files_limit()
    if args.max_connections + MAX_LINGERING > open_files - 64:  # open ones, and those in a lingering close
        sys.exit(f"error: --max-connections {args.max_connections} needs more file descriptors than the {open_files} allowed")
    try:
        check_sampling(args.temperature, args.top_k)
    except ValueError as e:
        parser.error(str(e))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("warning: serving beyond localhost without --api-key: anyone who can reach the port can use the model", flush=True)
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
        # CUDA: bf16 weights, decoding as a CUDA graph (one per batch and length bucket, kept by the worker's Engine)
        workers.append(Worker(gpu_id=i, engine=Engine(for_inference(model), tokenizer)))
        print(f"worker {i}: {args.source}/{meta['model_tag']} step {meta['step']} on {device}", flush=True)
    model_name = f"nanochat-{args.source}-{meta['model_tag']}"
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    app = create_app(workers, model_name=model_name, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     max_queue=args.max_queue, api_key=args.api_key, host=args.host, allowed_hosts=allowed_hosts,
                     body_timeout=args.body_timeout)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {model_name} at http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    make_server(app, args.host, port, args.max_connections, args.header_timeout, args.write_timeout).run(sockets=[sock])


if __name__ == "__main__":
    main()
