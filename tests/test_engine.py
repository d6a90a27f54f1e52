"""Engine: KV-cache generation equals full recompute, seeded sampling, several samples, tool use, UTF-8 streaming."""

import pytest
import torch

from nanochat.engine import Engine, StreamDecoder
from tests.helpers_tiny import ScriptedModel, load_tiny

PROMPTS = ["what is 3 plus 4?", "tell me about the owl", "hello", "Café 日本語 ☕ zebra quantum"]


@pytest.fixture
def tiny(base_dir):
    torch.set_num_threads(1)
    model, tokenizer, _ = load_tiny(base_dir)
    return model, tokenizer


def prompt_ids(tokenizer, text):
    return tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})


def greedy_recompute(model, tokens, max_tokens):
    """Reference decoding: the whole sequence through the model at every step, no cache."""
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(tokens):]


def test_greedy_kv_cache_equals_full_recompute(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    for text in PROMPTS:
        tokens = prompt_ids(tokenizer, text)
        # 3 samples share one prefill: every row must match the batch-1 no-cache reference, past the stop token too
        columns = [col for col, _ in engine.generate(tokens, num_samples=3, max_tokens=40, temperature=0.0)]
        rows = [[col[i] for col in columns] for i in range(3)]
        ref = greedy_recompute(model, tokens, len(columns))
        assert rows[0] == rows[1] == rows[2] == ref, text
        # top-k 1 at any temperature is greedy too
        sampled, _ = engine.generate_batch(tokens, max_tokens=40, temperature=1.0, top_k=1)
        stop = next((i for i, t in enumerate(ref) if t in engine.stop_tokens), len(ref))
        assert sampled[0] == ref[:stop]
    # the trained tiny model answers in the chat format and stops by itself
    (reply,), _ = engine.generate_batch(prompt_ids(tokenizer, "hello"), max_tokens=60, temperature=0.0)
    assert tokenizer.decode(reply) == "Hello! I am a tiny model. How can I help you today?"


def test_seeded_sampling_is_reproducible_and_samples_differ(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    tokens = prompt_ids(tokenizer, "what is 12 plus 30?")
    a, masks = engine.generate_batch(tokens, num_samples=6, max_tokens=30, temperature=1.0, top_k=50, seed=7)
    b, _ = engine.generate_batch(tokens, num_samples=6, max_tokens=30, temperature=1.0, top_k=50, seed=7)
    c, _ = engine.generate_batch(tokens, num_samples=6, max_tokens=30, temperature=1.0, top_k=50, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1, "samples of one prompt should differ"
    assert all(m == [1] * len(r) for r, m in zip(a, masks))  # no tool call: every token sampled


def test_tool_use_forces_calculator_output(tiny):
    _, tokenizer = tiny
    special = tokenizer.encode_special
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end, end = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    expr, five, junk = tokenizer.encode("2+3"), tokenizer.encode("5"), tokenizer.encode("x")[0]
    assert len(five) == 1
    # the "model" writes a python block, then junk where the tool output goes (the engine must override it)
    script = [py_start, *expr, py_end, junk, junk, junk] + tokenizer.encode(" done") + [end]
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer)
    tokens = prompt_ids(tokenizer, "what is 2+3?")
    results, masks = engine.generate_batch(tokens, num_samples=2, max_tokens=30, temperature=0.0)
    expected = [py_start, *expr, py_end, out_start, five[0], out_end] + tokenizer.encode(" done")
    for r, m in zip(results, masks):
        assert r == expected
        assert m == [1] * (len(expr) + 2) + [0, 0, 0] + [1] * len(tokenizer.encode(" done"))
    assert tokenizer.decode(results[0]) == "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> done"

    # an expression the calculator refuses gets no output: the model's own tokens go through unchanged
    bad = tokenizer.encode("__import__('os')")
    script = [py_start, *bad, py_end, junk, end]
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer)
    results, masks = engine.generate_batch(tokens, max_tokens=30, temperature=0.0)
    assert results[0] == [py_start, *bad, py_end, junk] and masks[0] == [1] * len(results[0])


def test_stream_decoder_never_splits_utf8(tiny):
    _, tokenizer = tiny
    text = "Café naïve 日本語 ☕🙂 über ok"
    ids = tokenizer.encode(text)
    # the tiny vocabulary has no merges for these characters: several tokens per character
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 5  # still streamed piece by piece, not all at the end


def test_tiny_temperatures_are_greedy_and_bad_ones_are_refused(tiny):
    from nanochat.gpt import MIN_TEMPERATURE, check_sampling, sample_next_token
    gen = torch.Generator().manual_seed(0)
    logits = 15 * torch.tanh(torch.randn(4, 400, generator=gen) / 2)  # soft-capped like the model's
    # 1e-45 (a float32 denormal) and 1e-38 used to overflow logits / T, so softmax gave NaN and multinomial raised
    for t in (1e-45, 1e-38, 1e-20, MIN_TEMPERATURE / 2):
        for top_k in (None, 1, 50):
            for x in (logits, logits.bfloat16()):
                assert torch.equal(sample_next_token(x, gen, t, top_k), x.argmax(-1, keepdim=True)), (t, top_k, x.dtype)
    sampled = sample_next_token(logits[:1].expand(64, -1), gen, 1.0)  # above the floor: sampling proper
    assert len(set(sampled[:, 0].tolist())) > 1
    for bad in (float("nan"), float("inf"), -float("inf"), -1e-45, True, "0.5", None):
        with pytest.raises(ValueError, match="temperature"):
            check_sampling(bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            check_sampling(1.0, bad)
    assert check_sampling(0, 0) == (0.0, None)
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        next(engine.generate(prompt_ids(tokenizer, "hello"), temperature=float("nan")))
    (reply,), _ = engine.generate_batch(prompt_ids(tokenizer, "hello"), max_tokens=20, temperature=1e-45, top_k=1)
    (ref,), _ = engine.generate_batch(prompt_ids(tokenizer, "hello"), max_tokens=20, temperature=0.0)
    assert reply == ref
