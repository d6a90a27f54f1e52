"""
Inference throughput: prefill and decode tokens/s at batch 1 and batched; decoding with GPT.forward's KV cache,
with nanochat.decode's fixed-shape step eagerly and (CUDA) replayed as CUDA graphs, with and without
torch.compile, and by full recompute; and the Engine end to end (shared prefill, sampling, per-row bookkeeping).
Also the operations one eager decode step runs (aten ops that compute; on CUDA the kernels, compiled step too):
the launch count that makes small-batch decoding launch-bound.

    python -m bench.bench_inference --depth 20       # random d20 weights: prompt 512, 512 generated, batch 1 and 8
    python -m bench.bench_inference -i sft           # a saved checkpoint (latest tag/step), Engine rows too
    python -m bench.bench_inference -i base --model-tag tiny --prompt-len 128 --gen-len 64 --require-greedy

The model is prepared as the chat scripts prepare it (nanochat.decode.for_inference: bf16 weights on CUDA).
"full recompute" decodes by running the whole sequence through the model at every step (no cache): its cost
grows with the sequence, the cache's does not. Prompts are random tokens, or with a checkpoint validation text
when the base data is there (a trained model is then on familiar ground).

Free-running greedy tokens diverge for good at the first near-tie that rounding flips, so they cannot tell a
rounding difference from a wrong step: random weights in bf16 are full of near-ties. The teacher-forced rows can:
every path is fed the same tokens and its next-token logits are compared at every step with GPT.forward's KV
cache (relative L2 difference, share of equal argmax). A wrong position, mask or cache slot gives differences of
order 0.1-1; bf16 rounding about 1e-3. The run exits with status 1 if any path differs by more than
--max-rel-error. The greedy tokens' agreement over the first --greedy-tokens per row is printed too; with a
trained checkpoint (few near-ties) --require-greedy makes it a check as well.
"""

import argparse
import sys
import time

import torch

from nanochat.common import autocast_context, autodetect_device_type, compute_init, device_synchronize
from nanochat.decode import BUCKET, Decoder, for_inference
from nanochat.gpt import KVCache, config_from_depth, gpt_on_meta
from nanochat.stage import STAGE_NAMES

parser = argparse.ArgumentParser(description="Benchmark inference: prefill/decode tokens/s, CUDA graph, KV cache vs recompute")
parser.add_argument("-i", "--source", type=str, default="sft", choices=STAGE_NAMES, help="checkpoint stage (without --depth)")
parser.add_argument("--model-tag", type=str, default=None)
parser.add_argument("--step", type=int, default=None)
parser.add_argument("--depth", type=int, default=0, help="benchmark a randomly initialised model of this depth instead of a checkpoint")
parser.add_argument("--vocab-size", type=int, default=65536, help="with --depth")
parser.add_argument("--sequence-len", type=int, default=2048, help="with --depth")
parser.add_argument("--prompt-len", type=int, default=512)
parser.add_argument("--gen-len", type=int, default=512, help="tokens decoded per row")
parser.add_argument("--batch-size", type=int, default=8, help="the batched case (batch 1 is always measured)")
parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the best is kept")
parser.add_argument("--no-recompute", action="store_true", help="skip the (slow) full-recompute decode")
parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled step (torch.compile + CUDA graph)")
parser.add_argument("--bucket", type=int, default=BUCKET, help="a decode step attends over the filled cache slots "
                    "rounded up to a multiple of this (one CUDA graph per bucket)")
parser.add_argument("--max-rel-error", type=float, default=1e-2, help="exit 1 if a decode path's teacher-forced "
                    "logits differ from GPT.forward's KV cache by more than this (relative L2; bf16 rounding is ~1e-3)")
parser.add_argument("--greedy-tokens", type=int, default=64, help="greedy tokens per row whose agreement is reported")
parser.add_argument("--require-greedy", action="store_true", help="exit 1 also if any decode path's first "
                    "--greedy-tokens greedy tokens differ from GPT.forward's KV cache (for a trained checkpoint)")
parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
args = parser.parse_args()

_, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
tokenizer = None
if args.depth:
    config = config_from_depth(args.depth, args.vocab_size, args.sequence_len)
    model = gpt_on_meta(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections: every block would be the identity
        for block in model.transformer.h:
            for p in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                p.normal_(std=p.size(1) ** -0.5)
    what = f"random d{args.depth}"
else:
    from nanochat.checkpoint import load_model
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (or benchmark random weights: --depth 12)")
    config = model.config
    what = f"{args.source}/{meta['model_tag']} step {meta['step']}"
model = for_inference(model)
P, G = args.prompt_len, args.gen_len
if P + G > config.sequence_len:
    raise SystemExit(f"error: --prompt-len + --gen-len = {P + G} exceeds the model's context {config.sequence_len}")
cuda = device.type == "cuda"
print(f"{what}: {model.num_params() / 1e6:.1f}M params, {config.n_layer} layers, width {config.n_embd}, "
      f"context {config.sequence_len}, {model.lm_head.weight.dtype} weights, on "
      f"{torch.cuda.get_device_name(device) if cuda else device}")
autocast = autocast_context(device.type)
gen = torch.Generator().manual_seed(0)


def make_prompt(B):
    """(B, P) ids: validation text when a checkpoint's tokenizer and the base data are there, else random."""
    if tokenizer is not None:
        from nanochat.dataset import parquets_iter_batched
        stream = []
        try:
            for docs in parquets_iter_batched("val"):
                for ids in tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id()):
                    stream += ids
                if len(stream) >= B * P:
                    return torch.tensor(stream[:B * P]).view(B, P).to(device), "validation text"
        except FileNotFoundError:
            pass
    return torch.randint(0, config.vocab_size, (B, P), generator=gen).to(device), "random tokens"


def timed(fn, setup=lambda: None):
    """Best wall time of fn(setup()) over the repeats, after a warm-up; setup is not timed. -> (seconds, result)"""
    fn(setup())
    best, out = float("inf"), None
    for _ in range(args.repeats):
        state = setup()
        device_synchronize(device.type)
        t0 = time.perf_counter()
        out = fn(state)
        device_synchronize(device.type)
        best = min(best, time.perf_counter() - t0)
    return best, out


def next_ids(logits):
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def prefill(prompt):
    """The prompt into a fresh cache -> (cache, first generated ids)."""
    cache = KVCache(prompt.size(0), config.n_kv_head, P + G, config.n_embd // config.n_head, config.n_layer)
    with autocast:
        return cache, next_ids(model(prompt, kv_cache=cache))


@torch.inference_mode()
def decode_cached(state):
    cache, ids = state
    out = []
    with autocast:
        for _ in range(G - 1):
            ids = next_ids(model(ids, kv_cache=cache))
            out.append(ids)
    return torch.cat(out, 1)


def static_setup(decoder, prompt):
    def setup():
        cache, ids = prefill(prompt)
        decoder.prefill(cache)
        return decoder, ids
    return setup


@torch.inference_mode()
def decode_static(state):
    decoder, ids = state
    out = []
    for _ in range(G - 1):
        ids = decoder.step(ids).argmax(-1, keepdim=True)
        out.append(ids)
    return torch.cat(out, 1)


@torch.inference_mode()
def decode_recompute(seq):
    with autocast:
        for _ in range(G - 1):
            seq = torch.cat([seq, next_ids(model(seq))], 1)
    return seq[:, P + 1:]


@torch.inference_mode()
def teacher_forced(prompt, tokens, decoders):
    """Feed GPT.forward's KV cache and every decoder the first generated ids, then tokens (B, G - 1) column by
    column -> {name: (relative L2 difference of all next-token logits to GPT.forward's, share of equal argmax)}."""
    cache, ids = prefill(prompt)
    for decoder in decoders.values():
        decoder.prefill(cache)
    diff2, equal = dict.fromkeys(decoders, 0.0), dict.fromkeys(decoders, 0)
    norm2 = 0.0
    for i in range(G - 1):
        with autocast:
            ref = model(ids, kv_cache=cache)[:, -1].float()
        norm2 += ref.square().sum().item()
        for name, decoder in decoders.items():
            logits = decoder.step(ids).float()
            diff2[name] += (logits - ref).square().sum().item()
            equal[name] += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        ids = tokens[:, i:i + 1]
    return {name: ((diff2[name] / norm2) ** 0.5, equal[name] / tokens.numel()) for name in decoders}


# aten ops that only make views, allocate or dispatch to another op: no kernel of their own
NO_KERNEL = {"aten::" + name for name in (
    "view", "as_strided", "slice", "transpose", "unsqueeze", "squeeze", "expand", "select", "split", "split_with_sizes",
    "chunk", "narrow", "permute", "t", "reshape", "_reshape_alias", "_unsafe_view", "alias", "detach", "unbind",
    "empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg", "to", "type_as", "contiguous", "lift_fresh",
    "result_type", "is_nonzero")}


def ops_per_step(decoder, prompt):
    """(aten ops that compute, CUDA kernels) in one step of a prefilled decoder, after a warm-up step. An op counts
    if no aten op under it computes (aten::linear -> aten::mm counts once). CPU decomposes some ops a CUDA kernel
    does in one (rms_norm): a proxy for the launch count, exact on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cache, ids = prefill(prompt)
    decoder.prefill(cache)
    decoder.step(ids)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        decoder.step(ids)
        device_synchronize(device.type)
    events = prof.events()

    def computes(e):
        return e.name.startswith("aten::") and (e.name not in NO_KERNEL or any(computes(c) for c in e.cpu_children))

    ops = sum(1 for e in events if e.name.startswith("aten::") and e.name not in NO_KERNEL
              and not any(computes(c) for c in e.cpu_children))
    return ops, sum(1 for e in events if e.device_type == DeviceType.CUDA)


N_GREEDY = min(args.greedy_tokens, G - 1)  # every path decodes G - 1 tokens after the prefill's


def greedy_agreement(tokens, reference):
    """-> (first N_GREEDY of every row identical, share equal over those)"""
    a, b = tokens[:, :N_GREEDY], reference[:, :N_GREEDY]
    return torch.equal(a, b), (a == b).float().mean().item()


# rows are printed as they are measured: a run cut by a time limit (compiles on a cold cache) keeps what it measured
print(f"\nprompt {P} tokens, {G} generated per row, best of {args.repeats}\n")
print(f"{'phase':<48} {'batch':>5} {'tokens':>8} {'seconds':>9} {'tokens/s':>11}", flush=True)
notes, failures = [], []


def add_row(name, B, n, t):
    print(f"{name:<48} {B:>5} {n:>8} {t:>9.4f} {n / t:>11,.0f}", flush=True)


for B in sorted({1, args.batch_size}):
    prompt, prompt_kind = make_prompt(B)
    t, _ = timed(prefill, lambda: prompt)
    add_row("prefill", B, B * P, t)
    # every decoder starts from the prompt plus its first token and produces G - 1 more per row
    t_cached, cached = timed(decode_cached, lambda: prefill(prompt))
    add_row("decode, KV cache (GPT.forward)", B, B * (G - 1), t_cached)
    new_decoder = lambda **kw: Decoder(model, B, P + G, bucket=args.bucket, **kw)
    t_eager, eager = timed(decode_static, static_setup(new_decoder(compile_step=False), prompt))
    add_row("decode, static KV cache, eager", B, B * (G - 1), t_eager)
    fastest, fastest_name = t_eager, "static cache, eager"
    greedy = {"static KV cache, eager": eager}
    forced = {"static KV cache, eager": new_decoder(compile_step=False)}
    graphs = [("static KV cache, CUDA graph", False)] + ([("static KV cache, compiled + CUDA graph", True)]
                                                         if not args.no_compile else [])
    for name, compiled in graphs if cuda else []:
        decoder = new_decoder(cuda_graph=True, compile_step=compiled)
        setup = static_setup(decoder, prompt)
        t0 = time.perf_counter()
        decode_static(setup())  # the first step in each bucket compiles (once per shape) and records its graph
        device_synchronize(device.type)
        t_first = time.perf_counter() - t0
        t_graph, graphed = timed(decode_static, setup)
        add_row(f"decode, {name}", B, B * (G - 1), t_graph)
        same, share = greedy_agreement(graphed, eager)
        notes.append(f"batch {B}: greedy tokens, {name} against eager, first {N_GREEDY} per row: "
                     f"{'identical' if same else 'DIFFERENT'} ({share:.1%} equal); speedup over eager "
                     f"{t_eager / t_graph:.1f}x; first call ({'compile, ' if compiled else ''}warm-up and capture of "
                     f"{len(decoder.graphs)} bucket graphs, decode) {t_first:.2f} s")
        greedy[name], forced[name] = graphed, decoder
        if t_graph < fastest:
            fastest, fastest_name = t_graph, name
    for compiled in (False, True) if cuda and not args.no_compile else (False,):
        ops, kernels = ops_per_step(new_decoder(compile_step=compiled), prompt)
        notes.append(f"batch {B}: one {'compiled' if compiled else 'eager'} decode step (no graph): "
                     + (f"{ops} aten ops that compute" if not compiled else "")
                     + (f"{', ' if not compiled else ''}{kernels} CUDA kernels" if cuda else "")
                     + f" ({config.n_layer} layers)")
    for name, (rel, agree) in teacher_forced(prompt, cached, forced).items():
        notes.append(f"batch {B}: teacher-forced, {name} against GPT.forward's KV cache: logits differ by {rel:.2e} "
                     f"(relative L2), argmax equal at {agree:.1%} of steps")
        if not rel <= args.max_rel_error:  # (a NaN fails too)
            failures.append(f"batch {B}: {name}: teacher-forced logits differ by {rel:.2e} > {args.max_rel_error:.0e}")
    if not args.no_recompute:
        t, recomputed = timed(decode_recompute, lambda: torch.cat([prompt, prefill(prompt)[1]], 1))
        add_row("decode, full recompute (no cache)", B, B * (G - 1), t)
        notes.append(f"batch {B}: KV cache speedup over full recompute: {t / fastest:.1f}x "
                     f"({fastest_name}), {t / t_cached:.1f}x (GPT.forward)")
        greedy["full recompute"] = recomputed
    for name, tokens in greedy.items():
        same, share = greedy_agreement(tokens, cached)
        notes.append(f"batch {B}: greedy tokens, {name} against GPT.forward's KV cache, first {N_GREEDY} "
                     f"per row ({prompt_kind} prompt): {'identical' if same else 'DIFFERENT'} ({share:.1%} equal)")
        if args.require_greedy and not same:
            failures.append(f"batch {B}: {name}: greedy tokens differ from GPT.forward's KV cache "
                            f"within the first {N_GREEDY}")
    if tokenizer is not None:
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
        tokens = prompt[0].tolist()

        def run_engine(_):
            return sum(1 for _ in engine.generate(tokens, num_samples=B, max_tokens=G, temperature=1.0, top_k=50, seed=0))

        t, steps = timed(run_engine)
        add_row("Engine.generate (shared prefill, sampling)", B, B * steps, t)

print()
for note in notes:
    print(note)
for failure in failures:
    print(f"error: {failure}", file=sys.stderr)
if failures:
    sys.exit(1)
