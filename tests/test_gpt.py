import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from bench.bench_loss import saved_for_backward
from nanochat.gpt import GPT, LEGACY_FIELDS, GPTConfig, KVCache, _ReluSquaredLinear, _RMSNorm, config_from_depth

torch.set_num_threads(1)

# the first release's model (every later switch off); FULL below has every switch on (the defaults are a subset)
MHA = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, **LEGACY_FIELDS)
GQA = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **LEGACY_FIELDS)
# every later switch on: value embeddings and the smear gate carry state across KV-cache steps
FULL = GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, value_embeds=True,
                 lambdas=True, smear=True, backout=True, qk_scale=1.2, rotary_base=100000.0, init="uniform")


def build(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    return model


def randomized(config, seed=0):
    """At init every block is the identity (zero output projections), so attention would not matter and a
    KV-cache bug could hide; give every matrix real weights instead."""
    model = build(config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # per-layer scalars and gates' strengths: clearly non-neutral
                p.uniform_(0.3, 0.8)
            elif "wte" not in name:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model.eval()


def cache_for(model, batch_size, seq_len):
    c = model.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, device="cpu", dtype=torch.float32)


def test_shapes_and_backward():
    model = build(GQA)
    idx = torch.randint(0, GQA.vocab_size, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, GQA.vocab_size) and logits.dtype == torch.float32
    assert model.transformer.h[0].attn.c_k.weight.shape == (2 * 8, 32)  # 2 kv heads of dim 8
    loss = model(idx, idx)
    assert loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_loss_at_init_is_uniform():
    config = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build(config)
    idx = torch.randint(0, config.vocab_size, (4, 64))
    loss = model(idx, idx).item()
    assert abs(loss - math.log(config.vocab_size)) < 0.1, loss


def test_softcap_and_loss_reductions():
    model = randomized(MHA)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # huge raw logits must still be capped at 15
    idx = torch.randint(0, MHA.vocab_size, (2, 10))
    targets = idx.clone()
    targets[0, :4] = -1
    logits = model(idx)
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 10)
    assert torch.all(per_token[0, :4] == 0)
    expected = torch.nn.functional.cross_entropy(logits[targets != -1], targets[targets != -1])
    torch.testing.assert_close(model(idx, targets), expected)
    torch.testing.assert_close(per_token.sum() / 16, expected)


@pytest.mark.parametrize("chunk_rows", [8, None, 64])  # 5 chunks, the last one short; the default; one chunk
def test_chunked_loss_equals_plain_softcapped_cross_entropy_in_value_and_gradient(chunk_rows, monkeypatch):
    """The training loss never materialises all the logits at once; it is still softcapped cross-entropy, in value
    and in gradient for any per-token upstream gradient (chat_rl weights each token's log-probability), and a
    target of -1 has loss 0 and no gradient, a chunk of nothing but -1 included."""
    import nanochat.gpt
    from nanochat.gpt import SOFTCAP, softcapped_cross_entropy
    monkeypatch.setattr(nanochat.gpt, "LOSS_CHUNK_BYTES", 50 * 4 * 6)  # the default: 6 rows of vocab 50
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = (3 * torch.randn(50, 16)).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[5:9] = -1
    targets[24:32] = -1  # a whole chunk of 8
    upstream = torch.randn(37)
    plain = torch.nn.functional.cross_entropy(SOFTCAP * torch.tanh((x @ w.T) / SOFTCAP), targets, ignore_index=-1,
                                              reduction="none")
    (plain * upstream).sum().backward()
    want = (plain.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    chunked = softcapped_cross_entropy(x, w, targets, chunk_rows=chunk_rows)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked.detach(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, want[2], rtol=1e-6, atol=1e-6)
    ignored = targets == -1
    assert torch.all(chunked[ignored] == 0) and torch.all(x.grad[ignored] == 0)
    assert torch.all(plain[~ignored] > 0)


def test_loss_chunk_is_a_fixed_size_of_logits():
    """At vocab 65,536 (d20) a chunk is 512 tokens of fp32 logits (128 MiB); the CPU presets' vocabs keep
    their whole micro-batch (16 x 256 tokens) in one chunk, computed as before chunking existed."""
    from nanochat.gpt import LOSS_CHUNK_BYTES
    assert LOSS_CHUNK_BYTES // (4 * 65536) == 512
    assert LOSS_CHUNK_BYTES // (4 * 8192) >= 16 * 256


def test_bf16_residual_stream_under_autocast_matches_fp32_within_bf16_rounding():
    """Under bf16 autocast (CUDA training; CPU autocast here) the residual stream is bf16 from the embedding on, as
    nanochat keeps it; without autocast (CPU training) it stays fp32. Loss, logits and gradients match the fp32
    model's to bf16 rounding (autocast alone, fp32 residual: logits 0.8 %, gradients 1.1 %)."""
    model = randomized(FULL, seed=1).train()
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 97, (4, 32), generator=gen), torch.randint(0, 97, (4, 32), generator=gen)
    residual = []
    model.transformer.h[1].register_forward_pre_hook(lambda module, args: residual.append(args[0].dtype))
    loss = model(idx, targets)
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = model(idx, targets)
        logits_bf16 = model(idx)
    loss_bf16.backward()
    assert residual == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert abs(loss_bf16.item() - loss.item()) < 1e-3 * loss.item()
    assert (logits_bf16 - logits).norm() / logits.norm() < 2e-2
    for (name, p), w in zip(model.named_parameters(), want):  # the embeddings' rows (bf16 once looked up) included
        if "wte" in name or "value_embeds" in name:
            assert (p.grad - w).norm() / w.norm() < 3e-2, name
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([g.flatten() for g in want])
    assert (got - want).norm() / want.norm() < 3e-2


def kept_storages(fn):
    """fn()'s result and the storages of the tensors its autograd graph keeps for backward."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage()) or t, lambda t: t):
        out = fn()
    return out, {s.data_ptr() for s in kept}


@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_rms_norm_function_equals_f_rms_norm_and_keeps_its_output_not_its_input(scale):
    """The norm under autocast: in fp32 it equals F.rms_norm * scale (value exact at scale 1, within 1e-6 otherwise;
    the gradient within 1e-6, its op order differs); in bf16 its value is the fp32 one rounded once and its
    gradient matches to bf16 rounding; for backward it keeps its output and 1/rms, not its input."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=gen) * 3).requires_grad_()
    g = torch.randn(3, 5, 64, generator=gen)
    want = F.rms_norm(x, (64,)) * scale
    (want_grad,) = torch.autograd.grad(want, x, g)
    got, kept = kept_storages(lambda: _RMSNorm.apply(x, scale, torch.float32))
    (got_grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0 if scale == 1.0 else 1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    assert got.untyped_storage().data_ptr() in kept and x.untyped_storage().data_ptr() not in kept and len(kept) == 2
    xb = x.detach().bfloat16().requires_grad_()
    got_bf16 = _RMSNorm.apply(xb, scale, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert torch.equal(got_bf16, (F.rms_norm(xb.float(), (64,)) * scale).bfloat16()) or scale != 1.0
    torch.testing.assert_close(got_bf16.float(), want, rtol=1e-2, atol=1e-2)
    (grad_bf16,) = torch.autograd.grad(got_bf16, xb, g.bfloat16())
    assert (grad_bf16.float() - want_grad).norm() / want_grad.norm() < 1e-2


def test_relu_squared_linear_equals_the_plain_expression_exactly_and_keeps_only_its_input():
    """c_proj(relu(h)^2) as one function: bit-identical value and gradients to the plain expression in fp32 and
    under CPU bf16 autocast (same roundings), keeping only h (and the weight, a parameter) for backward."""
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 7, 32, generator=gen), torch.randn(16, 32, generator=gen)
    g = torch.randn(2, 7, 16, generator=gen)
    h[0, 0, :4] = 0  # relu's kink: zero gradient both ways
    for autocast in (False, True):
        hh = (h.bfloat16() if autocast else h).requires_grad_()
        ww = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain = F.linear(F.relu(hh).square(), ww)
            fused, kept = kept_storages(lambda: _ReluSquaredLinear.apply(hh, ww))
        assert fused.dtype == plain.dtype and torch.equal(fused, plain)
        want = torch.autograd.grad(plain, (hh, ww), g.to(plain.dtype))
        got = torch.autograd.grad(fused, (hh, ww), g.to(plain.dtype))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert kept == {hh.untyped_storage().data_ptr(), ww.untyped_storage().data_ptr()}


@pytest.mark.parametrize("cuda_policy", [False, True], ids=["cpu-autocast", "cuda-autocast-ops"])
def test_bytes_saved_for_backward_per_token_under_autocast_are_what_backward_needs(cuda_policy, monkeypatch):
    """Under bf16 autocast one forward keeps, per layer and token: the attention's input, q, k, v and output and
    the MLP's input in bf16 (C values each), the MLP's pre-activation (4C), and in fp32 the 1/rms of two norms and
    of q and k per head and attention's log-sum-exp per head; once: the embedding's and final norm's outputs
    (bf16, with their 1/rms), the token ids and targets. Also with CUDA autocast's fp32 ops (rms_norm, pow)
    emulated, which kept 2-3x this before (an fp32 copy per norm and of relu's output, a bf16 copy per reader).
    Autocast's bf16 weight copies: the block matrices but the MLP's c_proj; the rotary rows cast once per forward."""
    C, H, L, B, T = 64, 4, 2, 2, 64
    model = build(GPTConfig(sequence_len=T, vocab_size=97, n_layer=L, n_head=H, n_kv_head=H, n_embd=C))
    monkeypatch.setattr(gpt, "LOSS_CHUNK_BYTES", 4 * 97 * 32)  # chunks smaller than the batch, as at scale
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 97, (B, T), generator=gen), torch.randint(0, 97, (B, T), generator=gen)
    saved = saved_for_backward(model, idx, targets, cuda_policy=cuda_policy)
    per_layer = 2 * (6 * C + 4 * C) + 4 * (2 + 3 * H)
    once = 2 * (2 * C + 4) + 8 + 8  # + the token ids and the targets (int64)
    activations = sum(v for k, v in saved.items() if k not in ("weight copies", "rotary"))
    bound = (L * per_layer + once) * B * T + 8  # + the loss's divisor, the count of targets (an int64)
    assert 0.9 * bound <= activations <= bound
    assert saved["weight copies"] == 2 * L * (4 * C * C + 4 * C * C)
    assert saved["rotary"] == 2 * T * (C // H // 2) * 2


def test_gqa_equals_mha_with_shared_kv_heads():
    """enable_gqa semantics: query head h reads kv head h // (n_head / n_kv_head)."""
    gqa = randomized(GQA, seed=1)
    mha = GPT(MHA)
    mha.init_weights()
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("c_k.weight", "c_v.weight")):
            state[key] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, GQA.vocab_size, (2, 12))
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [MHA, GQA, FULL], ids=["mha", "gqa", "full"])
def test_kv_cache_greedy_equals_full_recompute(config):
    model = randomized(config, seed=1)
    prompt = [5, 17, 3, 88, 42, 9]
    ids = list(prompt)
    full_logits = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids]))[0, -1]
            full_logits.append(logits)
            ids.append(int(logits.argmax()))
    generated = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    assert generated == ids[len(prompt):]
    assert len(set(generated)) > 3  # a real continuation, not one repeated token
    # logits themselves agree, step by step
    cache = cache_for(model, 1, 32)
    with torch.no_grad():
        step_logits = model(torch.tensor([prompt]), kv_cache=cache)[0, -1]
        for i, tok in enumerate(generated[:-1]):
            torch.testing.assert_close(step_logits, full_logits[i], rtol=1e-4, atol=1e-4)
            step_logits = model(torch.tensor([[tok]]), kv_cache=cache)[0, -1]
    assert cache.get_pos() == len(prompt) + len(generated) - 1


@pytest.mark.parametrize("config", [MHA, GQA, FULL], ids=["mha", "gqa", "full"])
def test_kv_cache_prefill_broadcasts_to_batch(config):
    """One batch-1 prefill shared by 3 samples, which then continue with different tokens."""
    model = randomized(config)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    conts = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    with torch.no_grad():
        small = cache_for(model, 1, len(prompt))
        model(torch.tensor([prompt]), kv_cache=small)
        big = cache_for(model, 3, 16)
        big.prefill(small)
        assert big.get_pos() == len(prompt)
        for j in range(conts.size(1)):
            step = model(conts[:, j:j + 1], kv_cache=big)[:, -1]
            for b in range(3):
                full = model(torch.tensor([prompt + conts[b, :j + 1].tolist()]))[0, -1]
                torch.testing.assert_close(step[b], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [MHA, GQA, FULL], ids=["mha", "gqa", "full"])
def test_kv_cache_chunked_prefill(config):
    """Chunks after a prefix see the whole prefix and are causal within themselves."""
    model = randomized(config)
    seq = torch.randint(0, config.vocab_size, (2, 15))
    with torch.no_grad():
        full = model(seq)
        cache = cache_for(model, 2, 20)
        pieces = []
        for a, b in [(0, 5), (5, 9), (9, 10), (10, 15)]:
            pieces.append(model(seq[:, a:b], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_overflow_is_an_error():
    model = randomized(MHA)
    cache = cache_for(model, 1, 4)
    with pytest.raises(ValueError, match="KVCache full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_meta_build_matches_direct_build():
    direct = GPT(GQA)
    torch.manual_seed(3)
    direct.init_weights()
    with torch.device("meta"):
        meta = GPT(GQA)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (k, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(direct.cos, meta.cos) and torch.equal(direct.sin, meta.sin)
    assert direct.cos.shape == (1, GQA.sequence_len * 10, 1, 4)


def test_sampling_is_seeded_and_top_k_restricts():
    model = randomized(MHA)
    a = list(model.generate([1, 2, 3], max_tokens=8, temperature=1.0, seed=7))
    b = list(model.generate([1, 2, 3], max_tokens=8, temperature=1.0, seed=7))
    assert a == b
    first = model(torch.tensor([[1, 2, 3]]))[0, -1]
    top2 = set(first.topk(2).indices.tolist())
    for seed in range(10):
        assert next(model.generate([1, 2, 3], max_tokens=1, top_k=2, seed=seed)) in top2


def test_switches_off_are_the_first_release_model_and_old_checkpoints_load_so():
    """A config saved before the switches existed means all of them off; with them off the model has exactly the
    first release's parameters. A config from a newer version fails with a message saying so."""
    saved = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
    old = GPTConfig.from_saved(saved)
    assert not (old.value_embeds or old.lambdas or old.smear or old.backout)
    assert (old.qk_scale, old.rotary_base, old.init) == (1.0, 10000.0, "normal")
    names = [n for n, _ in GPT(old).named_parameters()]
    assert names == ["transformer.wte.weight"] + [f"transformer.h.{i}.{m}.weight" for i in range(3) for m in (
        "attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head.weight"]
    assert GPTConfig.from_saved(dict(saved, smear=True)).smear
    with pytest.raises(ValueError, match="newer nanochat-diloco"):
        GPTConfig.from_saved(dict(saved, window_pattern="SSSL"))


def test_defaults_are_what_the_ablation_kept():
    """bench/bench_model.py, 3 seeds: kept QK scale 1.2, the uniform init, NorMuon (and, in base_train, cautious
    Muon weight decay), which lower val bpb at the tiny preset and at depth 4 x width 256; value embeddings and the
    smear gate lowered it per token but not per second, nanochat's 65 % warmdown not at the second shape."""
    c = GPTConfig()
    assert (c.qk_scale, c.init, c.rotary_base) == (1.2, "uniform", 10000.0)
    assert not (c.value_embeds or c.lambdas or c.smear or c.backout)
    adamw, muon = build(GQA).setup_optimizers()
    group = muon.param_groups[0]
    assert (group["ortho"], group["beta2"], group["weight_decay"]) == ("ns5", 0.9, 0.0)  # decay: base_train's flag
    assert all(g["betas"] == (0.8, 0.95) for g in adamw.param_groups)


def test_full_model_parameters_and_optimizer_groups():
    model = build(FULL)
    # value embeddings on layers 2 and 0 (alternate, counted back from the last), gates of 12 channels
    assert sorted(model.value_embeds) == ["0", "2"] and model.value_embeds["0"].weight.shape == (97, 16)
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [True, False, True]
    assert model.transformer.h[0].attn.ve_gate.weight.shape == (2, 12)
    assert model.resid_lambdas.tolist() == pytest.approx([1.15, 1.10, 1.05])
    assert model.x0_lambdas.tolist() == pytest.approx([0.20, 0.125, 0.05])
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    adamw, muon = model.setup_optimizers(adamw_betas="nanochat", muon_weight_decay=0.2)
    groups = {id(p): g for g in adamw.param_groups for p in g["params"]}
    assert groups[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    assert groups[id(model.transformer.wte.weight)]["betas"] == (0.8, 0.995)
    assert groups[id(model.value_embeds["0"].weight)]["lr"] == pytest.approx(groups[id(model.transformer.wte.weight)]["lr"] / 2)
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for p in model.transformer.h.parameters()}
    assert muon.param_groups[0]["weight_decay"] == muon.param_groups[0]["initial_weight_decay"] == 0.2
    # lookups cost no FLOPs: the value embeddings are left out like the token embedding
    lookups = 97 * 32 + 2 * 97 * 16
    assert model.estimate_flops() == 6 * (model.num_params() - lookups) + 12 * 3 * 4 * 8 * 32


def test_num_params_and_flops_known_values():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **LEGACY_FIELDS)
    model = build(config)
    # per layer: c_q 32*32 + c_k 16*32 + c_v 16*32 + attn c_proj 32*32 + c_fc 128*32 + mlp c_proj 32*128
    per_layer = 1024 + 512 + 512 + 1024 + 4096 + 4096  # 11264
    wte = lm_head = 64 * 32  # 2048 each
    assert model.num_params() == 2 * per_layer + wte + lm_head == 26624
    # 6 * (params - wte) + 12 * layers * heads * head_dim * seq = 6 * 24576 + 12 * 2 * 4 * 8 * 16
    assert model.estimate_flops() == 147456 + 12288 == 159744


def test_config_from_depth():
    c = config_from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (20, 1280, 10, 10)
    c = config_from_depth(2, vocab_size=4096, sequence_len=256, head_dim=64)
    assert (c.n_embd, c.n_head) == (128, 2)
    c = config_from_depth(3, vocab_size=4096, sequence_len=256, head_dim=128, n_kv_head=1)
    assert (c.n_embd, c.n_head, c.n_kv_head) == (256, 2, 1)  # 192 rounded up to whole heads


def test_setup_optimizers_groups_and_lrs():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=192, **LEGACY_FIELDS)
    model = build(config)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    scale = (192 / 768) ** -0.5  # = 2
    lm_head_group, emb_group = adamw.param_groups
    assert lm_head_group["params"] == [model.lm_head.weight]
    assert emb_group["params"] == [model.transformer.wte.weight]
    assert lm_head_group["lr"] == lm_head_group["initial_lr"] == pytest.approx(0.004 * scale)
    assert emb_group["lr"] == emb_group["initial_lr"] == pytest.approx(0.2 * scale)
    assert lm_head_group["weight_decay"] == 0.1
    assert muon.param_groups[0]["lr"] == muon.param_groups[0]["initial_lr"] == 0.02
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for p in model.transformer.h.parameters()}
