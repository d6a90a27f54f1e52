"""
The training loss's memory: peak-RSS rise and time of one forward + backward of a small model at a large vocab,
where the (tokens, vocab) fp32 logits dominate (CPU; a proxy for the loss's transient on the GPU).

    python -m bench.bench_loss                                # depth 1, vocab 65,536, 8 x 2048 tokens
    python -m bench.bench_loss --chunk-rows 8192,2048,1024    # the loss's chunk size (rows of logits at once)

Each measurement runs in a fresh process: the model and a batch are built, then ru_maxrss (the process's peak
resident set) is read before and after one forward + backward; the rise is the step's transient (logits, their
gradients, the weights' gradients; the model's own activations are small at depth 1). Then --repeats more steps
are timed and the best is kept.

    python -m bench.bench_loss --saved                        # activation memory of d20 (an estimate, see below)
    python -m bench.bench_loss --saved --cuda-policy 0        # ... with CPU autocast's op policy as it is
    python -m bench.bench_loss --saved --compiled             # ... and what the compiled model keeps (~1 min)

--saved counts the bytes autograd keeps for backward after one forward of the d20 config (vocab 65,536) under bf16
autocast, per token, by where they are saved (attention, MLP, norms, embedding, loss), on fake tensors (shapes
only: instant, no memory), at batch 1 x 128 and x 256 tokens. SDPA keeps O(T) for backward (its output and
log-sum-exp, as flash attention does), so per-token figures carry over to 2048 tokens; the two lengths show it
(equal per-token figures). With params, optimizer state and the loss's transient it estimates the peak of a
65,536-token (32 x 2048) training step. It is an ESTIMATE of eager PyTorch: on the GPU the model is compiled,
and Inductor chooses what to keep (often less: it recomputes cheap pointwise ops), and the CUDA autocast
policy differs from the CPU's (--cuda-policy 1, the default, emulates the ops where it matters). --compiled
runs AOTAutograd with Inductor's decompositions and partitioner on real CPU tensors at 1 and 2 layers of d20's
width and counts what the backward graph takes from the forward: the partitioner's choices, though not CUDA
autocast's policy nor the CUDA caching allocator's overhead.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(depth, vocab_size, batch_size, sequence_len, chunk_rows, repeats):
    """In this process: {"rise": bytes of peak RSS added by the first forward + backward, "seconds": best step}."""
    import torch
    import nanochat.gpt as gpt
    torch.manual_seed(0)
    if chunk_rows:
        gpt.LOSS_CHUNK_BYTES = chunk_rows * 4 * vocab_size
    model = gpt.GPT(gpt.config_from_depth(depth, vocab_size, sequence_len))
    model.init_weights()
    idx = torch.randint(0, vocab_size, (batch_size, sequence_len))
    targets = torch.randint(0, vocab_size, (batch_size, sequence_len))
    before = peak_rss_bytes()
    model(idx, targets).backward()
    rise = peak_rss_bytes() - before
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(idx, targets).backward()
        best = min(best, time.perf_counter() - t0)
    return {"rise": rise, "seconds": best, "chunk_rows": gpt.LOSS_CHUNK_BYTES // (4 * vocab_size)}


# --- activation memory: the tensors one forward saves for backward (--saved) ---

# ops that CUDA autocast runs in fp32 while CPU autocast leaves them in bf16 (torch 2.13's AutocastCUDA kernels, read
# with torch._C._dispatch_dump): an fp32 copy of the input is made, and saved for backward, on the GPU only
CUDA_FP32_OPS = ("rms_norm", "pow", "square", "__pow__")


class _Recorder(torch.overrides.TorchFunctionMode):
    """Notes the outermost torch function running (its saved tensors are filed under it) and, with cuda_policy,
    upcasts the inputs of CUDA_FP32_OPS to fp32 under autocast as CUDA autocast does."""

    def __init__(self, cuda_policy):
        super().__init__()
        self.cuda_policy, self.op = cuda_policy, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.cuda_policy and name in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a
            args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        outer, self.op = self.op, self.op or name
        try:
            return func(*args, **kwargs)
        finally:
            self.op = outer


def saved_for_backward(model, idx, targets, autocast=True, cuda_policy=False):
    """Bytes of the tensors autograd keeps for backward after one training forward, each storage counted once
    (views share one), by where they were saved: {"embedding", "attention", "mlp", "norms", "loss", "rotary",
    "weight copies"} ("weight copies": autocast's bf16 casts of the weights, a fixed cost; "rotary": the tables'
    rows, per position, not per sequence; the rest scale with tokens). Parameters saved as they are cost nothing
    extra and are left out. The model and tensors may be fake (FakeTensorMode): nothing is computed.
    The training loss recomputes its logits chunk by chunk, keeping only its inputs (the checkpoint saves them
    through these hooks): the caller should make the chunk smaller than the batch (LOSS_CHUNK_BYTES) to measure
    it as it is at scale."""
    import nanochat.gpt as gpt
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    rotary_shape = (1, idx.size(1), 1, model.config.n_embd // model.config.n_head // 2)
    seen, out = set(), dict.fromkeys(("embedding", "attention", "mlp", "norms", "loss", "rotary", "weight copies"), 0)
    where = ["embedding"]
    recorder = _Recorder(cuda_policy)

    def file(t, category):
        s = t.untyped_storage()
        if s._cdata in seen or s._cdata in params:
            return
        seen.add(s._cdata)
        if tuple(t.shape) in weight_shapes:
            category = "weight copies"
        elif tuple(t.shape) == rotary_shape:
            category = "rotary"
        out[category] += s.nbytes()

    def pack(t):
        file(t, "norms" if recorder.op == "rms_norm" else where[-1])
        return t

    def enter(kind):
        return lambda module, args: where.append(kind)  # hooks return None: inputs and outputs stay as they are

    def leave(module, args, output):
        where.pop()

    hooks = []
    for module in model.modules():
        kind = {"CausalSelfAttention": "attention", "MLP": "mlp"}.get(type(module).__name__)
        if kind:
            hooks.append(module.register_forward_pre_hook(enter(kind)))
            hooks.append(module.register_forward_hook(leave))
    hooks.append(model.transformer.h[-1].register_forward_hook(lambda module, args, output: where.append("loss") and None))
    norm_fn = gpt.norm

    def norm_filed(x, *args):  # an autograd.Function is no torch function: name the norm's saves here
        outer, recorder.op = recorder.op, "rms_norm"
        try:
            return norm_fn(x, *args)
        finally:
            recorder.op = outer

    gpt.norm = norm_filed
    try:
        with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, targets)
    finally:
        gpt.norm = norm_fn
        for h in hooks:
            h.remove()
    del loss
    return out


def static_bytes(model):
    """Bytes of what a training step keeps between steps: fp32 parameters, AdamW's two moments (lm_head,
    embeddings, scalars), Muon's momentum and NorMuon's per-neuron second moment (block matrices). Gradients are
    set to None after each step, so they are not there at the forward's peak (the first, lm_head's, comes
    during the loss's backward, while every activation is still held; counted in "grads" on its own)."""
    matrices = {id(p) for p in model.transformer.h.parameters()}
    total = sum(p.numel() for p in model.parameters())
    adamw = sum(p.numel() for p in model.parameters() if id(p) not in matrices)
    muon = total - adamw
    normuon = sum(max(p.shape) for p in model.transformer.h.parameters())
    return {"params": 4 * total, "adamw": 8 * adamw, "muon": 4 * muon + 4 * normuon,
            "lm_head grad": 4 * model.lm_head.weight.numel()}


def saved_report(depth, vocab_size, batch_size, sequence_len, target_tokens, cuda_policy):
    """Print saved-for-backward bytes per token by where they are saved, at two lengths (their ratio shows
    whether attention keeps O(T) or O(T^2)), and the estimated peak of a training step at target_tokens."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import nanochat.gpt as gpt
    cfg = gpt.config_from_depth(depth, vocab_size, max(sequence_len, 2048))
    chunk_bytes = gpt.LOSS_CHUNK_BYTES
    with FakeTensorMode():
        model = gpt.GPT(cfg)
        rows = []
        for T in (sequence_len // 2, sequence_len):
            idx, targets = (torch.zeros(batch_size, T, dtype=torch.long) for _ in range(2))
            gpt.LOSS_CHUNK_BYTES = 4 * vocab_size * max(1, batch_size * T // 4)  # chunked, as at scale
            try:
                rows.append(saved_for_backward(model, idx, targets, cuda_policy=cuda_policy))
            finally:
                gpt.LOSS_CHUNK_BYTES = chunk_bytes
        static = static_bytes(model)
    n = batch_size * sequence_len
    per_token = {k: v / n for k, v in rows[1].items() if k not in ("weight copies", "rotary")}
    half = {k: v / (n // 2) for k, v in rows[0].items() if k in per_token}
    policy = "CUDA's (rms_norm and pow upcast to fp32, emulated)" if cuda_policy else "CPU's"
    print(f"ESTIMATE, not a measurement on a GPU: d{depth} ({cfg.n_embd} wide, {cfg.n_head} heads), vocab {vocab_size:,}, "
          f"eager forward under bf16 autocast with {policy} op policy, on fake tensors (nothing computed)")
    print(f"saved for backward per token (KiB), unique storages, at {batch_size} x {sequence_len // 2} and "
          f"{batch_size} x {sequence_len} tokens:")
    for k in per_token:
        print(f"  {k:<12} {half[k] / 1024:>9.1f} {per_token[k] / 1024:>9.1f}")
    total = sum(per_token.values())
    print(f"  {'total':<12} {sum(half.values()) / 1024:>9.1f} {total / 1024:>9.1f}")
    T_target = 2048
    rotary = rows[1]["rotary"] / sequence_len * T_target
    transient = 4 * chunk_bytes  # a chunk's recompute and backward hold about four logits-shaped tensors
    peak = {"params": static["params"], "optimizer state": static["adamw"] + static["muon"],
            "lm_head grad": static["lm_head grad"], "weight copies (autocast)": rows[1]["weight copies"],
            f"activations ({target_tokens:,} tokens)": total * target_tokens, "rotary rows": rotary,
            "loss chunk transient": transient}
    print(f"estimated peak of a training step at {target_tokens:,} tokens ({target_tokens // T_target} x {T_target}), GiB:")
    for k, v in peak.items():
        print(f"  {k:<28} {v / 2 ** 30:>7.2f}")
    print(f"  {'total':<28} {sum(peak.values()) / 2 ** 30:>7.2f}")
    return per_token, peak


def compiled_saved(depth, vocab_size, sequence_len, width_depth=20, recompute_materialized=False):
    """(activation bytes, weight-copy bytes) the COMPILED training forward keeps for backward: the model (width of
    d{width_depth}, `depth` layers) through AOTAutograd with Inductor's decompositions and min-cut partitioner (what
    torch.compile does on the GPU, but run eagerly here on CPU under bf16 autocast, with CPU autocast's op policy),
    at batch 1 x sequence_len; the backward graph's inputs other than parameters, inputs and incoming gradients
    are what is kept. Real tensors: d20 width costs about 30 s per layer count on one CPU thread.
    recompute_materialized: let the partitioner recompute in backward what backward materialises anyway (relu^2
    for c_proj's weight gradient, the bf16 weight casts), which by default it keeps (a speed choice)."""
    import nanochat.gpt as gpt
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    kept = []

    def backward_inputs(gm, example_inputs):
        kept.extend(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"
                    and not n.name.startswith(("tangents", "primals")) and isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g), bw_compiler=backward_inputs,
                                     partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())

    cfg = gpt.config_from_depth(width_depth, vocab_size, max(sequence_len, 2048))
    cfg.n_layer = depth
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    model.init_weights()
    idx, targets = (torch.randint(0, vocab_size, (1, sequence_len)) for _ in range(2))
    chunk_bytes, gpt.LOSS_CHUNK_BYTES = gpt.LOSS_CHUNK_BYTES, 4 * vocab_size * (sequence_len // 4)
    try:
        with torch._functorch.config.patch(ban_recompute_materialized_backward=not recompute_materialized), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.compile(model, backend=backend, fullgraph=True)(idx, targets)
        loss.backward()
    finally:
        gpt.LOSS_CHUNK_BYTES = chunk_bytes
        torch._dynamo.reset()
    per_token = sum(t.numel() * t.element_size() for t in kept if sequence_len in t.shape or sequence_len // 4 in t.shape)
    return per_token, sum(t.numel() * t.element_size() for t in kept) - per_token


def compiled_report(vocab_size, sequence_len, target_tokens, peak, recompute_materialized=False):
    """Per-token bytes kept by the compiled model at 1 and 2 layers of d20's width, extrapolated to 20 layers;
    the estimated peak is saved_report's with these activations and weight copies in place of the eager ones."""
    (a1, w1), (a2, w2) = (compiled_saved(d, vocab_size, sequence_len, recompute_materialized=recompute_materialized)
                          for d in (1, 2))
    layer, rest = (a2 - a1) / sequence_len, (2 * a1 - a2) / sequence_len
    total = rest + 20 * layer
    knob = ", ban_recompute_materialized_backward off" if recompute_materialized else ""
    print(f"ESTIMATE: compiled (AOTAutograd + Inductor's partitioner{knob}, CPU autocast policy), d20 width, "
          f"vocab {vocab_size:,}:")
    print(f"  per layer {layer / 1024:.1f} KiB/token, outside the layers {rest / 1024:.1f} KiB/token, "
          f"20 layers {total / 1024:.1f} KiB/token -> {total * target_tokens / 2 ** 30:.2f} GiB at {target_tokens:,} tokens; "
          f"bf16 weight copies {(w1 + 19 * (w2 - w1)) / 2 ** 30:.2f} GiB")
    peak = {k: v for k, v in peak.items() if not k.startswith(("activations", "weight copies"))}
    peak_total = sum(peak.values()) + total * target_tokens + w1 + 19 * (w2 - w1)
    print(f"  estimated peak of a compiled training step at {target_tokens:,} tokens: {peak_total / 2 ** 30:.2f} GiB")


def main():
    parser = argparse.ArgumentParser(description="Peak-RSS rise and time of one forward + backward (the loss's transient)")
    parser.add_argument("--depth", type=int, default=None, help="default 1 (20 with --saved)")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (1 with --saved)")
    parser.add_argument("--sequence-len", type=int, default=None, help="default 2048 (256 with --saved)")
    parser.add_argument("--chunk-rows", type=str, default="", help="comma-separated chunk sizes in tokens (default: the code's, "
                        "nanochat.gpt.LOSS_CHUNK_BYTES of fp32 logits)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--saved", action="store_true", help="activation memory: bytes saved for backward per token")
    parser.add_argument("--cuda-policy", type=int, default=1, help="with --saved: 1 = emulate CUDA autocast's fp32 ops")
    parser.add_argument("--compiled", action="store_true", help="with --saved: also what the compiled model keeps "
                        "(about a minute)")
    parser.add_argument("--recompute-materialized", type=int, default=0, help="with --compiled: 1 = let the "
                        "partitioner recompute what backward materialises anyway (torch._functorch.config)")
    parser.add_argument("--target-tokens", type=int, default=32 * 2048, help="with --saved: tokens of the estimated step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.saved:
        _, peak = saved_report(args.depth or 20, args.vocab_size, args.batch_size or 1, args.sequence_len or 256,
                               args.target_tokens, bool(args.cuda_policy))
        if args.compiled:
            compiled_report(args.vocab_size, args.sequence_len or 256, args.target_tokens, peak,
                            bool(args.recompute_materialized))
        return
    args.depth, args.batch_size, args.sequence_len = args.depth or 1, args.batch_size or 8, args.sequence_len or 2048
    shape = (args.depth, args.vocab_size, args.batch_size, args.sequence_len)
    if args.child:
        print(json.dumps(measure(*shape, int(args.chunk_rows or 0), args.repeats)))
        return
    print(f"depth {args.depth}, vocab {args.vocab_size:,}, {args.batch_size} x {args.sequence_len} tokens, one thread")
    print(f"{'chunk rows':>10} {'peak RSS rise':>14} {'fwd+bwd s':>10}")
    for rows in (args.chunk_rows.split(",") if args.chunk_rows else [""]):
        cmd = [sys.executable, "-m", "bench.bench_loss", "--child", "--chunk-rows", rows, "--repeats", str(args.repeats),
               "--depth", str(args.depth), "--vocab-size", str(args.vocab_size), "--batch-size", str(args.batch_size),
               "--sequence-len", str(args.sequence_len)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{rows or 'default':>10} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['chunk_rows']:>10,} {r['rise'] / 2 ** 30:>10.2f} GiB {r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
