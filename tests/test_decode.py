"""The fixed-shape decode step (nanochat.decode, a CUDA graph on GPU) run eagerly on CPU: the same logits and
greedy tokens as GPT.forward's KV-cache path, through Engine too (several rows, GQA, seeded sampling, reuse)."""

import contextlib

import pytest
import torch

from nanochat.decode import Decoder, decode_step, for_inference
from nanochat.engine import Engine, HostCopy
from nanochat.gpt import KVCache
from tests.helpers_tiny import load_tiny
from tests.test_engine import PROMPTS, prompt_ids


@pytest.fixture
def tiny(base_dir):
    torch.set_num_threads(1)
    model, tokenizer, _ = load_tiny(base_dir)
    model = for_inference(model)
    assert not model.training and model.lm_head.weight.dtype == torch.float32  # CPU: eval mode, fp32 as before
    return model, tokenizer


@torch.inference_mode()
def test_decode_step_equals_the_kv_cache_forward(tiny):
    model, tokenizer = tiny
    c = model.config
    tokens = prompt_ids(tokenizer, "tell me about the owl")
    prefill = KVCache(1, c.n_kv_head, len(tokens), c.n_embd // c.n_head, c.n_layer)
    first = model(torch.tensor([tokens]), kv_cache=prefill)[:, -1]
    reference = KVCache(3, c.n_kv_head, len(tokens) + 30, c.n_embd // c.n_head, c.n_layer)
    reference.prefill(prefill)
    decoder = Decoder(model, 3, 64)
    decoder.prefill(prefill)
    ids = first.argmax(-1, keepdim=True).expand(3, 1).contiguous()
    ids[1] = 7  # rows that differ, so a mix-up between rows would show
    for _ in range(30):
        expected = model(ids, kv_cache=reference)[:, -1]
        got = decoder.step(ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        ids = expected.argmax(-1, keepdim=True)
    assert decoder.cache.length == len(tokens) + 30
    with pytest.raises(ValueError, match="Decoder full"):
        for _ in range(64):
            decoder.step(ids)


def test_engine_greedy_tokens_identical_with_the_static_cache(tiny):
    model, tokenizer = tiny
    plain, static = Engine(model, tokenizer), Engine(model, tokenizer, static_cache=True)
    assert not plain.static_cache and static.static_cache and not static.cuda_graph  # CPU: eager
    for text in PROMPTS:
        tokens = prompt_ids(tokenizer, text)
        want = [col for col, _ in plain.generate(tokens, num_samples=2, max_tokens=40, temperature=0.0)]
        got = [col for col, _ in static.generate(tokens, num_samples=2, max_tokens=40, temperature=0.0)]
        assert got == want, text
    # seeded sampling draws the same tokens too, and a reused decoder (same shape) starts clean
    a = plain.generate_batch(prompt_ids(tokenizer, "hello"), num_samples=3, max_tokens=30, temperature=1.0, seed=3)
    b = static.generate_batch(prompt_ids(tokenizer, "hello"), num_samples=3, max_tokens=30, temperature=1.0, seed=3)
    assert a == b
    assert sorted(static.decoders) == [(2, 128), (3, 128)]  # one per shape, reused (the context is 128)


def test_interleaved_generations_do_not_share_a_decoder(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, static_cache=True)
    a_tokens, b_tokens = prompt_ids(tokenizer, "hello"), prompt_ids(tokenizer, "tell me about the fox")
    alone = [[col for col, _ in engine.generate(t, max_tokens=20, temperature=0.0)] for t in (a_tokens, b_tokens)]
    a, b = engine.generate(a_tokens, max_tokens=20, temperature=0.0), engine.generate(b_tokens, max_tokens=20, temperature=0.0)
    together = list(zip(a, b))  # one step of each in turn, on decoders of the same shape
    assert [x for (x, _), _ in together] == alone[0][:len(together)]
    assert [y for _, (y, _) in together] == alone[1][:len(together)]
    assert not any(d.busy for d in engine.decoders.values())


@torch.inference_mode()
def test_decode_step_carries_every_model_switch():
    """Value embeddings, per-layer scalars, the smear gate (its previous embedding kept in the static cache),
    backout, QK scale: the fixed-shape step equals GPT.forward's KV-cache path, batch-1 prefill broadcast to 2."""
    from tests.test_gpt import FULL, randomized
    model = randomized(FULL, seed=1)
    c = model.config
    prompt = torch.tensor([[5, 17, 3, 88, 42, 9]])
    prefill = KVCache(1, c.n_kv_head, 6, c.n_embd // c.n_head, c.n_layer)
    model(prompt, kv_cache=prefill)
    reference = KVCache(2, c.n_kv_head, 20, c.n_embd // c.n_head, c.n_layer)
    reference.prefill(prefill)
    decoder = Decoder(model, 2, 20)
    decoder.prefill(prefill)
    ids = torch.tensor([[1], [2]])
    for _ in range(10):
        expected = model(ids, kv_cache=reference)[:, -1]
        got = decoder.step(ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        ids = expected.argmax(-1, keepdim=True)
    # and the first decoded position against a full recompute of prompt + token (the smear reads the prompt's end)
    fresh = Decoder(model, 2, 20)
    fresh.prefill(prefill)
    full = model(torch.cat([prompt.expand(2, -1), torch.tensor([[1], [2]])], dim=1))[:, -1]
    torch.testing.assert_close(fresh.step(torch.tensor([[1], [2]])), full, rtol=0, atol=1e-4)


class _CudaOnCpu:
    """Stand-ins for the torch.cuda stream and graph calls of Decoder._capture, so its warm-up runs on CPU. A real
    capture records kernels without running them, so the cache as it stands when the graph context opens is the
    state every replay starts from: the fake context keeps a copy of it (its own body then runs eagerly)."""

    def __init__(self, decoder, monkeypatch):
        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                self.pointers = None  # the addresses a captured graph would read and write

            def replay(self):
                pass

        @contextlib.contextmanager
        def graph(g, capture_error_mode=None):
            fake.captured_from = _decode_state(decoder.cache)
            g.pointers = {name: t.data_ptr() for name, t in _decode_tensors(decoder.cache).items()}
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        self.captured_from, self.capturing = None, False
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        decoder.cuda_graph = True  # the constructor refuses it off CUDA


def _decode_tensors(cache):
    named = {"pos": cache.pos, "prev_embedding": cache.prev_embedding}
    named.update({f"k{i}": t for i, t in enumerate(cache.k)})
    named.update({f"v{i}": t for i, t in enumerate(cache.v)})
    named.update({f"qkv{i}": t for i, t in enumerate(cache.qkv_weights)})
    return named


def _decode_state(cache):
    return {name: t.clone() for name, t in _decode_tensors(cache).items()}


def _smear_prefill(model, prompt):
    c = model.config
    cache = KVCache(1, c.n_kv_head, len(prompt), c.n_embd // c.n_head, c.n_layer)
    model(torch.tensor([prompt]), kv_cache=cache)
    return cache


@torch.inference_mode()
def test_graph_is_captured_from_the_prefilled_state_and_prefill_keeps_its_tensors(monkeypatch):
    """With the smear gate: the CUDA-graph warm-up runs real steps, which write pos, the k/v slot at pos and the
    previous embedding; all of it must be back as prefill left it when the graph is recorded. A later prefill
    must write into the same tensors the graph reads (not new ones), and decoding on from it must equal
    GPT.forward's KV-cache path."""
    from tests.test_gpt import FULL, randomized
    model = randomized(FULL, seed=1)
    c = model.config
    decoder = Decoder(model, 2, 20)
    fake = _CudaOnCpu(decoder, monkeypatch)
    decoder.prefill(_smear_prefill(model, [5, 17, 3, 88, 42, 9]))
    prefilled = _decode_state(decoder.cache)
    decoder.step(torch.tensor([[1], [2]]))  # warm-up, then the (fake) capture
    assert list(decoder.graphs) == [20] and fake.captured_from is not None  # one bucket: 20 slots (max_len)
    for name, want in prefilled.items():
        assert torch.equal(fake.captured_from[name], want), name
    # prefill again (the Engine reuses decoders): the same storage, now holding the new prompt's state
    second = _smear_prefill(model, [8, 1, 60])
    decoder.prefill(second)
    assert {name: t.data_ptr() for name, t in _decode_tensors(decoder.cache).items()} == decoder.graphs[20][0].pointers
    assert torch.equal(decoder.cache.prev_embedding, second.prev_embedding.expand(2, -1, -1))
    decoder.cuda_graph = False  # the fake graph cannot replay: decode on eagerly from the re-prefilled state
    reference = KVCache(2, c.n_kv_head, 20, c.n_embd // c.n_head, c.n_layer)
    reference.prefill(second)
    ids = torch.tensor([[4], [6]])
    for _ in range(4):
        expected = model(ids, kv_cache=reference)[:, -1]
        torch.testing.assert_close(decoder.step(ids), expected, rtol=0, atol=1e-5)
        ids = expected.argmax(-1, keepdim=True)


def _prefilled(model, prompt, batch_size, max_len, **decoder_kwargs):
    """(a Decoder, GPT.forward's KVCache) both holding `prompt` (a batch-1 prefill broadcast to batch_size)."""
    c = model.config
    prefill = _smear_prefill(model, prompt)
    reference = KVCache(batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head, c.n_layer)
    reference.prefill(prefill)
    decoder = Decoder(model, batch_size, max_len, **decoder_kwargs)
    decoder.prefill(prefill)
    return decoder, reference


@torch.inference_mode()
def test_fused_qkv_step_equals_the_kv_cache_forward_and_follows_the_weights_at_every_prefill():
    """The step's one q/k/v matmul (weights concatenated at prefill) equals GPT.forward's three to fp32 rounding.
    Weights trained in place between generations (chat_rl samples from a live policy) are picked up by the next
    prefill; a generation under way keeps the set it started with (so the step reads the fused copy)."""
    from tests.test_gpt import FULL, randomized
    model = randomized(FULL, seed=1)
    prompt, ids = [5, 17, 3, 88, 42, 9], torch.tensor([[1], [2]])
    decoder, reference = _prefilled(model, prompt, 2, 20)
    a = model.transformer.h[1].attn
    assert torch.equal(decoder.cache.qkv_weights[1], torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight]))
    torch.testing.assert_close(decoder.step(ids), model(ids, kv_cache=reference)[:, -1], rtol=0, atol=1e-5)
    for block in model.transformer.h:  # an optimizer step, in place
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    _, new_reference = _prefilled(model, prompt, 2, 20)
    expected = model(ids, kv_cache=new_reference)[:, -1]
    assert (decoder.step(ids) - expected).abs().max() > 1e-2  # mid-generation: the weights it was prefilled with
    decoder.prefill(_smear_prefill(model, prompt))
    torch.testing.assert_close(decoder.step(ids), expected, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_bucketed_attention_reads_only_the_filled_slots_and_equals_attention_over_all_slots():
    """Buckets of 4 slots: a step at position n attends over slots [0, 4 * (n // 4 + 1)). Before each step the slots
    past that bucket are filled with NaN, which any read would spread (a mask does not stop it); the logits equal a
    decoder attending over all 32 slots every step, and GPT.forward's KV cache."""
    from tests.test_gpt import FULL, randomized
    model = randomized(FULL, seed=1)
    prompt, ids = [5, 17, 3, 88, 42, 9], torch.tensor([[1], [2]])
    bucketed, reference = _prefilled(model, prompt, 2, 32, bucket=4)
    whole, _ = _prefilled(model, prompt, 2, 32, bucket=32)
    buckets = []
    for n in range(len(prompt), len(prompt) + 20):
        for t in bucketed.cache.k + bucketed.cache.v:  # unfilled slots: finite in the bucket (masked), NaN past it
            t[:, :, n:4 * (n // 4 + 1)], t[:, :, 4 * (n // 4 + 1):] = 0.0, float("nan")
        got, all_slots = bucketed.step(ids), whole.step(ids)
        buckets.append(bucketed.cache.bucket)
        assert whole.cache.bucket == 32
        expected = model(ids, kv_cache=reference)[:, -1]
        torch.testing.assert_close(got, all_slots, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        ids = expected.argmax(-1, keepdim=True)
    assert buckets == [8] * 2 + [12] * 4 + [16] * 4 + [20] * 4 + [24] * 4 + [28] * 2


@torch.inference_mode()
def test_one_graph_per_bucket_each_captured_around_the_compiled_step(monkeypatch):
    """compile_step=True: Decoder captures what torch.compile returned (fullgraph: no host sync may split it), one
    graph per bucket, each after two warm-up steps; on CPU the default is the plain step."""
    from tests.test_gpt import FULL, randomized
    model = randomized(FULL, seed=1)
    assert Decoder(model, 2, 20).step_fn is decode_step  # CPU: not compiled
    calls = []

    def fake_compile(fn, **kwargs):
        assert fn is decode_step and kwargs == {"fullgraph": True, "dynamic": True}

        def compiled(*args):
            calls.append("captured" if fake.capturing else "warm-up")
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    decoder = Decoder(model, 2, 20, compile_step=True, bucket=8)
    fake = _CudaOnCpu(decoder, monkeypatch)
    decoder.prefill(_smear_prefill(model, [5, 17, 3, 88, 42, 9]))
    for _ in range(12):  # positions 6 .. 17: buckets 8, 16 and 20 (the last one cut at max_len)
        decoder.step(torch.tensor([[1], [2]]))
    assert list(decoder.graphs) == [8, 16, 20]
    assert calls == ["warm-up", "warm-up", "captured"] * 3  # replays run nothing on the host


@torch.inference_mode()
def test_a_failing_compile_falls_back_to_the_plain_step(monkeypatch):
    """torch.compile failing on the serving machine (no Triton, an unsupported op) costs speed, not the service."""
    from tests.test_gpt import FULL, randomized

    def broken(*args):
        raise RuntimeError("no triton")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    model = randomized(FULL, seed=1)
    decoder, reference = _prefilled(model, [5, 17, 3, 88, 42, 9], 2, 20, compile_step=True)
    ids = torch.tensor([[1], [2]])
    with pytest.warns(UserWarning, match="decoding without it: RuntimeError: no triton"):
        got = decoder.step(ids)
    assert decoder.step_fn is decode_step
    torch.testing.assert_close(got, model(ids, kv_cache=reference)[:, -1], rtol=0, atol=1e-5)


def test_engine_reads_each_token_once_after_launching_the_step_that_consumes_it(tiny, monkeypatch):
    """No host sync per token but HostCopy.wait: a 32-token generation reads 32 columns, each after the step fed
    with it has been launched (so on CUDA the device decodes while the host reads); no other .tolist/.item/.cpu
    in the loop; the tokens are those of GPT.forward's KV-cache path."""
    model, tokenizer = tiny
    tokens = prompt_ids(tokenizer, "tell me about the owl")
    plain, static = Engine(model, tokenizer), Engine(model, tokenizer, static_cache=True)
    plain.stop_tokens = static.stop_tokens = set()  # never done: exactly max_tokens columns
    want = [col for col, _ in plain.generate(tokens, num_samples=2, max_tokens=32, temperature=1.0, seed=5)]
    log, reads = [], []
    real_step, real_wait = Decoder.step, HostCopy.wait

    def step(self, ids):
        log.append("step")
        return real_step(self, ids)

    def wait(self):
        log.append("wait")
        return [list(t) if isinstance(t, list) else real_tolist(t) for t in self.pending]

    real_tolist = torch.Tensor.tolist
    for name in ("tolist", "item", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, **k: reads.append(_name) or
                            getattr(torch._C.TensorBase, _name)(self, *a, **k))
    monkeypatch.setattr(Decoder, "step", step)
    monkeypatch.setattr(HostCopy, "wait", wait)
    got = [col for col, _ in static.generate(tokens, num_samples=2, max_tokens=32, temperature=1.0, seed=5)]
    monkeypatch.undo()
    assert got == want and len(got) == 32
    assert log == ["step", "wait"] * 31 + ["wait"]  # no step after the last token
    assert reads == []


def _bench_inference(capsys, argv):
    """Run bench_inference in this process -> (its exit status, its stdout)."""
    import runpy
    import sys
    old_argv = sys.argv
    sys.argv = ["bench_inference", *argv]
    status = 0
    try:
        runpy.run_module("bench.bench_inference", run_name="__main__")
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = old_argv
    return status, capsys.readouterr().out


def _teacher_forced_differences(out):
    import re
    return [float(x) for x in re.findall(r"teacher-forced, static KV cache, eager .* logits differ by (\S+) ", out)]


def test_bench_inference_fails_on_a_wrong_step_by_the_teacher_forced_error_not_on_rounding(capsys, monkeypatch):
    import nanochat.decode
    torch.set_num_threads(1)
    argv = ["--depth", "2", "--vocab-size", "512", "--sequence-len", "64", "--prompt-len", "16", "--gen-len", "12",
            "--batch-size", "2", "--repeats", "1", "--no-recompute", "--device-type", "cpu"]
    status, out = _bench_inference(capsys, argv)
    right = _teacher_forced_differences(out)
    assert status == 0 and len(right) == 2 and max(right) < 1e-5  # batch 1 and 2, fp32 on CPU: rounding only
    assert "greedy tokens, static KV cache, eager against GPT.forward's KV cache, first 11 per row (random tokens " \
           "prompt): identical (100.0% equal)" in out
    # a planted off-by-one rotary position in the static cache: the teacher-forced difference is of order 0.1
    monkeypatch.setattr(nanochat.decode.StaticKVCache, "rotary",
                        lambda self, cos, sin, T: (cos.index_select(1, self.pos + 1), sin.index_select(1, self.pos + 1)))
    status, out = _bench_inference(capsys, argv)
    wrong = _teacher_forced_differences(out)
    assert len(wrong) == 2 and min(wrong) > 1e-2
    assert status == 1  # the gate: above --max-rel-error (1e-2)
    # a looser gate passes the same run: the exit status follows the teacher-forced error alone
    status, _ = _bench_inference(capsys, argv + ["--max-rel-error", "10"])
    assert status == 0


def test_bench_inference_checks_greedy_tokens_of_a_trained_checkpoint(capsys, base_dir, monkeypatch):
    """The tiny chat model on validation text it knows (offline corpus of its own kind of conversations): every
    path's greedy tokens equal; --require-greedy turns a difference into exit status 1."""
    import nanochat.decode
    from nanochat.dataset import build_offline
    from tests.helpers_tiny import SOURCE, TAG, build_tiny, synthetic_conversations
    torch.set_num_threads(1)
    build_tiny(base_dir)
    build_offline(conversations=[{"id": f"c{i}", "conversations": [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c["messages"]]}
        for i, c in enumerate(synthetic_conversations(200, seed=1))], chars_per_shard=10_000, row_group_size=32)
    argv = ["-i", SOURCE, "--model-tag", TAG, "--prompt-len", "24", "--gen-len", "20", "--batch-size", "2",
            "--repeats", "1", "--greedy-tokens", "16", "--require-greedy", "--device-type", "cpu"]
    status, out = _bench_inference(capsys, argv)
    assert status == 0
    for name in ("static KV cache, eager", "full recompute"):
        for batch in (1, 2):
            assert f"batch {batch}: greedy tokens, {name} against GPT.forward's KV cache, first 16 per row " \
                   f"(validation text prompt): identical (100.0% equal)" in out
    # a planted off-by-one rotary position, let through the teacher-forced gate: the greedy check catches it
    monkeypatch.setattr(nanochat.decode.StaticKVCache, "rotary",
                        lambda self, cos, sin, T: (cos.index_select(1, self.pos + 1), sin.index_select(1, self.pos + 1)))
    status, out = _bench_inference(capsys, argv + ["--max-rel-error", "10"])
    assert status == 1 and "eager against GPT.forward's KV cache, first 16 per row (validation text prompt): DIFFERENT" in out
    status, _ = _bench_inference(capsys, [a for a in argv if a != "--require-greedy"] + ["--max-rel-error", "10"])
    assert status == 0
