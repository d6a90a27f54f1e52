"""
Inference throughput: prefill and decode tokens/s at batch 1 and batched, KV cache vs full recompute,
and the Engine end to end (shared prefill, sampling, per-row bookkeeping).

    python -m bench.bench_inference -i sft                          # a saved checkpoint (latest tag/step)
    python -m bench.bench_inference --depth 20 --sequence-len 2048  # random weights, no checkpoint needed

"full recompute" decodes by running the whole sequence through the model at every step (no cache): its
cost grows with the sequence, the cache's does not, so the ratio grows with --prompt-len and --gen-len.
"""

import argparse
import time

import torch

from nanochat.common import autocast_context, autodetect_device_type, compute_init, device_synchronize
from nanochat.gpt import GPT, KVCache, config_from_depth

parser = argparse.ArgumentParser(description="Benchmark inference: prefill/decode tokens/s, KV cache vs recompute")
parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage (without --depth)")
parser.add_argument("--model-tag", type=str, default=None)
parser.add_argument("--step", type=int, default=None)
parser.add_argument("--depth", type=int, default=0, help="benchmark a randomly initialised model of this depth instead of a checkpoint")
parser.add_argument("--vocab-size", type=int, default=65536, help="with --depth")
parser.add_argument("--sequence-len", type=int, default=2048, help="with --depth")
parser.add_argument("--prompt-len", type=int, default=128)
parser.add_argument("--gen-len", type=int, default=128, help="tokens decoded per row")
parser.add_argument("--batch-size", type=int, default=8, help="the batched case (batch 1 is always measured)")
parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the best is kept")
parser.add_argument("--no-recompute", action="store_true", help="skip the (slow) full-recompute decode")
parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
args = parser.parse_args()

_, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
tokenizer = None
if args.depth:
    config = config_from_depth(args.depth, args.vocab_size, args.sequence_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    what = f"random d{args.depth}"
else:
    from nanochat.checkpoint import load_model
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (or benchmark random weights: --depth 12)")
    config = model.config
    what = f"{args.source}/{meta['model_tag']} step {meta['step']}"
P, G = args.prompt_len, args.gen_len
if P + G > config.sequence_len:
    raise SystemExit(f"error: --prompt-len + --gen-len = {P + G} exceeds the model's context {config.sequence_len}")
print(f"{what}: {model.num_params() / 1e6:.1f}M params, {config.n_layer} layers, width {config.n_embd}, "
      f"context {config.sequence_len}, on {device}")
autocast = autocast_context(device.type)
gen = torch.Generator().manual_seed(0)


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


def new_cache(B):
    return KVCache(B, config.n_kv_head, P + G, config.n_embd // config.n_head, config.n_layer)


def next_ids(logits):
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def prefill(prompt):
    """The prompt into a fresh cache -> (cache, first generated ids)."""
    cache = new_cache(prompt.size(0))
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


@torch.inference_mode()
def decode_recompute(seq):
    with autocast:
        for _ in range(G - 1):
            seq = torch.cat([seq, next_ids(model(seq))], 1)
    return seq[:, P + 1:]


rows, speedups = [], {}
for B in sorted({1, args.batch_size}):
    prompt = torch.randint(0, config.vocab_size, (B, P), generator=gen).to(device)
    t, _ = timed(prefill, lambda: prompt)
    rows.append(("prefill", B, B * P, t, ""))
    # both decoders start from the prompt plus its first token and produce G - 1 more per row
    t_cached, cached = timed(decode_cached, lambda: prefill(prompt))
    rows.append(("decode, KV cache", B, B * (G - 1), t_cached, ""))
    if not args.no_recompute:
        t, recomputed = timed(decode_recompute, lambda: torch.cat([prompt, prefill(prompt)[1]], 1))
        agree = (cached == recomputed).float().mean().item()
        rows.append(("decode, full recompute", B, B * (G - 1), t, f"greedy tokens equal to the cached run: {agree:.0%}"))
        speedups[B] = t / t_cached
    if tokenizer is not None:
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
        tokens = prompt[0].tolist()

        def run_engine(_):
            return sum(1 for _ in engine.generate(tokens, num_samples=B, max_tokens=G, temperature=1.0, top_k=50, seed=0))

        t, steps = timed(run_engine)
        rows.append(("Engine.generate (shared prefill, sampling)", B, B * steps, t, ""))

print(f"\nprompt {P} tokens, {G} generated per row, best of {args.repeats}\n")
print(f"{'phase':<42} {'batch':>5} {'tokens':>8} {'seconds':>9} {'tokens/s':>11}")
for name, B, n, t, note in rows:
    print(f"{name:<42} {B:>5} {n:>8} {t:>9.4f} {n / t:>11,.0f}   {note}".rstrip())
for B, s in speedups.items():
    print(f"KV cache decode speedup over full recompute, batch {B}: {s:.1f}x")
