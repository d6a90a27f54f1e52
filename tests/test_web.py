"""chat_web against a real uvicorn on loopback: SSE format, OpenAI compatibility (the openai client), limits,
malformed input, UTF-8 streaming, and 20 concurrent requests."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from nanochat.engine import Engine
from scripts.chat_web import MAX_CONVERSATION_CHARS, MAX_MESSAGE_CHARS, MAX_MESSAGES, Worker, create_app
from tests.helpers_tiny import ScriptedModel, load_tiny, serve_in_thread

HELLO = [{"role": "user", "content": "hello"}]
HELLO_REPLY = "Hello! I am a tiny model. How can I help you today?"


@pytest.fixture
def tiny(base_dir):
    torch.set_num_threads(1)
    model, tokenizer, _ = load_tiny(base_dir)
    return model, tokenizer


@pytest.fixture
def server(tiny):
    model, tokenizer = tiny
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tokenizer))], model_name="nanochat-tiny", max_tokens=64)
    with serve_in_thread(app) as url:
        yield url


def sse_records(response):
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line."""
    text = response.text
    assert text.endswith("\n\n")
    records = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, f"malformed SSE event {event!r}"
        records.append(event[len("data: "):])
    return records


def greedy_reply(tiny, messages, max_tokens=64):
    model, tokenizer = tiny
    (ids,), _ = Engine(model, tokenizer).generate_batch(
        tokenizer.render_for_completion({"messages": messages}), max_tokens=max_tokens, temperature=0.0)
    return tokenizer.decode(ids)


def test_sse_stream(server, tiny):
    messages = [{"role": "user", "content": "tell me about the fox"}, {"role": "assistant", "content": "The fox lives in the forest."},
                {"role": "user", "content": "what is 7 plus 5?"}]
    r = httpx.post(f"{server}/chat/completions", json={"messages": messages, "temperature": 0.0}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    records = [json.loads(x) for x in sse_records(r)]
    assert records[-1] == {"done": True}
    tokens = records[:-1]
    assert len(tokens) > 3 and all(set(t) == {"token", "gpu"} and t["gpu"] == 0 and t["token"] for t in tokens)
    assert "".join(t["token"] for t in tokens) == greedy_reply(tiny, messages)

    # max_tokens bounds the reply; a seed makes sampling reproducible
    body = {"messages": HELLO, "temperature": 1.0, "top_k": 20, "max_tokens": 5, "seed": 3}
    a = [json.loads(x) for x in sse_records(httpx.post(f"{server}/chat/completions", json=body, timeout=30))]
    b = [json.loads(x) for x in sse_records(httpx.post(f"{server}/chat/completions", json=body, timeout=30))]
    assert a == b and len(a) - 1 <= 5

    for path in ("/", "/health", "/stats", "/v1/models"):
        assert httpx.get(server + path).status_code == 200
    assert "<textarea" in httpx.get(server + "/").text
    stats = httpx.get(server + "/stats").json()
    assert stats["requests"] == 3 and stats["tokens_generated"] > 0 and stats["mean_first_token_latency_s"] > 0


def test_openai_client(server, tiny):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["nanochat-tiny"]

    r = client.chat.completions.create(model="nanochat-tiny", messages=HELLO, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == HELLO_REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(tiny[1].encode(HELLO_REPLY))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model="nanochat-tiny", messages=HELLO, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 3 and "".join(deltas) == HELLO_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # several samples per prompt, cut by max_tokens
    r = client.chat.completions.create(model="nanochat-tiny", messages=[{"role": "user", "content": "what is 3 plus 9?"}],
                                       n=3, max_tokens=4, temperature=1.0, seed=5, extra_body={"top_k": 50})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 12

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nanochat-tiny", messages=HELLO, temperature=5)


LONG = "x" * (MAX_MESSAGE_CHARS + 1)
BAD_BODIES = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "role and content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
    ({"messages": HELLO + [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"messages": HELLO * 2}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * (MAX_MESSAGES // 2) + HELLO}, "too many messages"),
    ({"messages": [{"role": "user", "content": LONG}]}, "too long"),
    ({"messages": [{"role": "user", "content": "y" * MAX_MESSAGE_CHARS}, {"role": "assistant", "content": "y" * MAX_MESSAGE_CHARS}] * 2
      + [{"role": "user", "content": "y" * (MAX_CONVERSATION_CHARS - 4 * MAX_MESSAGE_CHARS + 1)}]}, "conversation is too long"),
    ({"messages": [{"role": "user", "content": "hello " * 500}]}, "context"),  # fine in characters, too many tokens
    ({"messages": HELLO, "temperature": -0.1}, "temperature"),
    ({"messages": HELLO, "temperature": 2.5}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_k": 0}, "top_k"),
    ({"messages": HELLO, "top_k": 1000}, "top_k"),
    ({"messages": HELLO, "top_k": 2.5}, "top_k"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 10**6}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": True}, "max_tokens"),
    ({"messages": HELLO, "seed": "abc"}, "seed"),
]


def test_limits_and_malformed_requests(server):
    client = httpx.Client(base_url=server, timeout=30)
    for path in ("/chat/completions", "/v1/chat/completions"):
        for body, words in BAD_BODIES:
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text[:200])
            error = r.json()["error"]
            assert words in error["message"] and error["type"] == "invalid_request_error", (body, error)
        for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"hello"', b"null"):
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"], raw
        r = client.post(path, content=b"{" + b" " * 1_100_000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    for body, words in ([{"messages": HELLO, "n": 0}, "n must"], [{"messages": HELLO, "n": 100}, "n must"],
                        [{"messages": HELLO, "stream": "yes"}, "stream"]):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert client.get("/nope").status_code == 404
    # still serving after all of that
    r = client.post("/chat/completions", json={"messages": HELLO, "temperature": 0.0})
    assert r.status_code == 200 and json.loads(sse_records(r)[-1]) == {"done": True}
    assert client.get("/health").json()["status"] == "ok"
    client.close()


def test_twenty_concurrent_requests(server, tiny):
    def chat(i):
        body = {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"}], "temperature": 0.0, "max_tokens": 24}
        r = httpx.post(f"{server}/chat/completions", json=body, timeout=60)
        records = [json.loads(x) for x in sse_records(r)]
        assert records[-1] == {"done": True}
        return "".join(t["token"] for t in records[:-1])

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(chat, range(20), timeout=90))
    # the single worker served them one after another, each exactly as if alone
    for i in (0, 7, 19):
        assert replies[i] == greedy_reply(tiny, [{"role": "user", "content": f"what is {i} plus {i}?"}], max_tokens=24)
    stats = httpx.get(server + "/stats").json()
    assert stats["requests"] == 20 and stats["waiting_requests"] == 0 and stats["workers"][0]["busy"] is False


def test_multibyte_characters_are_never_split(tiny):
    _, tokenizer = tiny
    text = "Café ☕ 日本語 🙂!"
    script = tokenizer.encode(text) + [tokenizer.encode_special("<|assistant_end|>")]
    app = create_app([Worker(gpu_id=0, engine=Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer))])
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/chat/completions", json={"messages": HELLO, "temperature": 0.0}, timeout=30)
        pieces = [json.loads(x)["token"] for x in sse_records(r)[:-1]]
        assert len(pieces) > 5 and all("\ufffd" not in p for p in pieces) and "".join(pieces) == text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = client.chat.completions.create(model="x", messages=HELLO, temperature=0, stream=True)
        deltas = [c.choices[0].delta.content or "" for c in chunks]
        assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text


class SlowScriptedModel(ScriptedModel):
    def forward(self, idx, kv_cache=None):
        time.sleep(0.02)
        return super().forward(idx, kv_cache)


def test_client_disconnect_stops_generation_and_frees_the_worker(tiny):
    _, tokenizer = tiny
    script = tokenizer.encode(" la" * 300)  # ~6 s of tokens at 20 ms each
    model = SlowScriptedModel(script, tokenizer.get_vocab_size(), sequence_len=512)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tokenizer))], max_tokens=400)
    with serve_in_thread(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/chat/completions", json={"messages": HELLO}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)[len("data: "):])["token"] == tokenizer.decode(script[:1])
        # the connection is closed mid-reply: the server must notice, stop generating and free the worker
        t0 = time.time()
        while client.get(f"{url}/stats").json()["requests"] < 1:
            assert time.time() - t0 < 5, "generation kept running after the client left"
            time.sleep(0.05)
        stats = client.get(f"{url}/stats").json()
        assert stats["workers"][0]["busy"] is False and stats["tokens_generated"] < 100
        r = client.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        assert r.json()["choices"][0]["message"]["content"] == tokenizer.decode(script[:3])

# -----------------------------------------------------------------------------
# OpenAI API: stop, n, logprobs, seed, refused fields (issue 30), through the official client, streaming and not


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(openai client, tiny model, tokenizer) against one server shared by the tests below."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("nanochat_base_api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        model, tokenizer, _ = load_tiny(base)
    app = create_app([Worker(gpu_id=0, engine=Engine(model, tokenizer))], model_name="nanochat-tiny", max_tokens=64)
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30), model, tokenizer


def stream_texts(chunks, n=1):
    """Per choice: (content, finish_reason, logprob entries) from a list of streamed chunks."""
    texts, reasons, entries = [""] * n, [None] * n, [[] for _ in range(n)]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            if choice.logprobs is not None and choice.logprobs.content:
                entries[choice.index] += choice.logprobs.content
    return texts, reasons, entries


def test_openai_stop_cuts_the_reply_before_the_stop_text(api):
    client, _, _ = api
    assert HELLO_REPLY.startswith("Hello! I am a tiny model.")  # the greedy reply the cases below cut
    for stop, expected in [("tiny", "Hello! I am a "), (["zebra", " model", "I am"], "Hello! "), ("!", "Hello"),
                           (["Hello"], ""), ("not in the reply", HELLO_REPLY)]:
        r = client.chat.completions.create(model="x", messages=HELLO, temperature=0, stop=stop)
        reason = "stop"  # a stop sequence, or the model's own end of reply
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, reason), stop
        chunks = list(client.chat.completions.create(model="x", messages=HELLO, temperature=0, stop=stop, stream=True,
                                                     stream_options={"include_usage": True}))
        texts, reasons, _ = stream_texts(chunks)
        assert (texts[0], reasons[0]) == (expected, reason), stop
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # cut by a stop sequence, the reply counts only the tokens sampled up to it
    full = client.chat.completions.create(model="x", messages=HELLO, temperature=0)
    cut = client.chat.completions.create(model="x", messages=HELLO, temperature=0, stop="tiny")
    assert 0 < cut.usage.completion_tokens < full.usage.completion_tokens


def test_openai_n_samples_with_stop_and_seed(api):
    client, _, _ = api
    ask = dict(model="x", messages=[{"role": "user", "content": "tell me about the owl"}], temperature=1.0, max_tokens=12)
    a = client.chat.completions.create(n=4, seed=11, **ask)
    b = client.chat.completions.create(n=4, seed=11, **ask)
    c = client.chat.completions.create(n=4, seed=12, **ask)
    texts = lambda r: [x.message.content for x in r.choices]
    assert [x.index for x in a.choices] == [0, 1, 2, 3]
    assert texts(a) == texts(b) and texts(a) != texts(c) and len(set(texts(a) + texts(c))) > 1
    # streamed with the same seed: the same four replies, interleaved by index
    chunks = list(client.chat.completions.create(n=4, seed=11, stream=True, **ask))
    assert stream_texts(chunks, 4)[0] == texts(a)
    # a stop sequence cuts each sample on its own
    cut = client.chat.completions.create(n=4, seed=11, stop=" ", **ask)
    for full, part, choice in zip(texts(a), texts(cut), cut.choices):
        assert part == full.split(" ")[0] and choice.finish_reason == ("stop" if " " in full else choice.finish_reason)


def test_openai_logprobs_are_the_models_own(api):
    client, model, tokenizer = api
    r = client.chat.completions.create(model="x", messages=HELLO, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content == HELLO_REPLY
    ids = tokenizer.encode(HELLO_REPLY)
    assert [bytes(e.bytes) for e in content] == [tokenizer.enc.decode_single_token_bytes(t) for t in ids]
    # the reference: one forward pass over prompt + reply, log-softmax at each reply position
    prompt = tokenizer.render_for_completion({"messages": HELLO})
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].float(), dim=-1)
    for i, (e, t) in enumerate(zip(content, ids)):
        assert abs(e.logprob - ref[i, t].item()) < 1e-4
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the likeliest
        assert [x.logprob for x in e.top_logprobs] == sorted((x.logprob for x in e.top_logprobs), reverse=True)
    # streamed: the same entries; logprobs without top_logprobs: none of the alternatives
    chunks = list(client.chat.completions.create(model="x", messages=HELLO, temperature=0, logprobs=True, stream=True))
    _, _, entries = stream_texts(chunks)
    assert [(e.token, round(e.logprob, 5)) for e in entries[0]] == [(e.token, round(e.logprob, 5)) for e in content]
    assert all(e.top_logprobs == [] for e in entries[0])
    assert client.chat.completions.create(model="x", messages=HELLO, max_tokens=3).choices[0].logprobs is None


def test_openai_unsupported_fields_are_refused_by_name(api):
    client, _, _ = api
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kwargs, field in [({"tools": [tool]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"tool_choice": "required"}, "tool_choice"), ({"top_p": 0.5}, "top_p"),
                          ({"presence_penalty": 1.0}, "presence_penalty"), ({"logit_bias": {"5": 10}}, "logit_bias"),
                          ({"extra_body": {"min_p": 0.1}}, "min_p"), ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"),
                          ({"stop": 7}, "stop"), ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                          ({"logprobs": "yes"}, "logprobs"), ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", messages=HELLO, max_tokens=2, **kwargs)
        assert e.value.body["param"] == field and field in e.value.body["message"], (kwargs, e.value.body)
    # their "off" values are fine: what a client sends by default must not fail
    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=2, top_p=1, presence_penalty=0, tools=[],
                                       response_format={"type": "text"}, user="someone", logprobs=False, stop=[])
    assert r.choices[0].finish_reason == "length"
