"""
Model and optimizer ablation: val bpb at equal tokens and tokens/s for the old defaults, each candidate change
added to it alone, and the kept changes together, over several seeds; optionally karpathy/nanochat's current
model and optimizer trained on the very same batches, for a side-by-side.

    python -m bench.bench_model                                   # tiny shape (depth 2, width 128), 60 steps, 3 seeds
    python -m bench.bench_model --shape d4w256 --steps 30         # the second CPU shape
    python -m bench.bench_model --nanochat ~/src/nanochat         # add nanochat main (a checkout of its repo)
    python -m bench.bench_model --variants base,ve,all --seeds 1  # a subset

Every run trains from scratch in its own process (one thread; --jobs of them at once) on fixed batches cut
from the offline pretraining shards by base_train's own loader (row packing): steps x 8,192 tokens of
sequence 256, a different slice of the train split per seed (seed s also seeds the init), the same val batches
for all. Val bpb is computed here, one formula for every arm. Tokens/s is measured apart, after the bpb runs, with the machine's threads, for base,
nanochat and the candidates that lowered bpb: each measurement a process of its own, the variants alternating,
the median of a few rounds. Peak RSS is a bpb run's own high-water mark.

A change is kept when it lowers the mean val bpb by more than two standard errors of the difference (seed
noise) and costs at most 3 % tokens/s. Results are cached per run (--fresh to redo) in
~/.cache/nanochat/bench/model/<shape>_rows/ with a markdown table written next to them.

nanochat's arms (its gpt.py and optim.py imported from the checkout, never copied): GPTConfig of the same shape
(its default window pattern), eager (TORCHDYNAMO_DISABLE=1: no compile on either side), under one of three
schedules (NANOCHAT_ARMS below). `nanochat` is the one its own base_train computes at this shape and batch;
`--variants base,all,nanochat --keep qk,init,normuon,cwd` sets our defaults against it:

    python -m bench.bench_model --nanochat ~/src/nanochat --variants base,all,nanochat,nanochat_tinylr,nanochat_oursched \
        --keep qk,init,normuon,cwd
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"tiny": dict(depth=2, width=128, head_dim=64), "d4w256": dict(depth=4, width=256, head_dim=64)}
SEQ, BATCH_TOKENS, VAL_BATCHES = 256, 8192, 8
LRS = dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)  # the tiny preset's (scripts/base_train.py)
NANOCHAT_WD = 0.28  # nanochat's --weight-decay, tuned at its d12 reference

# The first release's model and optimizer ("base", spelt out so that it stays itself whatever the defaults become),
# and each candidate as what it changes: GPTConfig fields, setup_optimizers arguments, schedule (lr warmdown ratio
# and final fraction, Muon momentum peaking at 0.97 and falling to 0.90 in the warmdown, Muon decay as a cosine).
BASE_OPTIM = dict(adamw_betas="flat", muon_ortho="ns5", muon_beta2=None, muon_weight_decay=0.0)
BASE_SCHEDULE = dict(warmdown=0.2, final_lr=0.0, momentum=False, wd_cosine=False)
CANDIDATES = {
    "ve": ("value embeddings (alternate layers, gated)", dict(config=dict(value_embeds=True))),
    "lambdas": ("per-layer residual and x0 scalars", dict(config=dict(lambdas=True))),
    "smear": ("previous-token gate", dict(config=dict(smear=True))),
    "backout": ("mid-layer backout", dict(config=dict(backout=True))),
    "qk": ("query/key x1.2 after QK-norm", dict(config=dict(qk_scale=1.2))),
    "rope": ("rotary base 100k", dict(config=dict(rotary_base=100000.0))),
    "init": ("uniform init, c_fc x0.4, wte 0.8", dict(config=dict(init="uniform"))),
    "polar": ("Polar Express orthogonalisation", dict(optim=dict(muon_ortho="polar"))),
    "normuon": ("NorMuon per-neuron normalisation", dict(optim=dict(muon_beta2=0.9))),
    "cwd": ("cautious weight decay in Muon (0.28, cosine)", dict(optim=dict(muon_weight_decay=NANOCHAT_WD),
                                                               schedule=dict(wd_cosine=True))),
    "adamw": ("per-group AdamW betas and decay", dict(optim=dict(adamw_betas="nanochat"))),
    "momentum": ("Muon momentum to 0.97, down to 0.90 in warmdown", dict(schedule=dict(momentum=True))),
    "lrsched": ("lr warmdown 65 % to 0.05", dict(schedule=dict(warmdown=0.65, final_lr=0.05))),
}


def variant_spec(name, keep):
    """The full spec of a variant: base + one candidate, or base + every kept candidate ("all")."""
    from nanochat.gpt import LEGACY_FIELDS
    names = keep if name == "all" else ([] if name == "base" else [name])
    spec = dict(config=dict(LEGACY_FIELDS), optim=dict(BASE_OPTIM), schedule=dict(BASE_SCHEDULE))
    for n in names:
        for k, v in CANDIDATES[n][1].items():
            spec[k].update(v)
    return spec


# ---------------------------------------------------------------------------------------------------------------
# one run (a child process): train on the cached batches, return val bpb, step times, peak RSS

def bits_per_byte(model, val_x, val_y, token_bytes):
    nats = nbytes = 0.0
    with torch.no_grad():
        for x, y in zip(val_x, val_y):
            loss = model(x, y, loss_reduction="none").view(-1).double()
            b = token_bytes[y.view(-1)]
            nats += (loss * (b > 0)).sum().item()
            nbytes += b.sum().item()
    return nats / (math.log(2) * nbytes)


def run_one(job):
    torch.set_num_threads(job["threads"])
    data = torch.load(job["batches"])
    seed, steps = job["seed"], job["steps"]
    shape = SHAPES[job["shape"]]
    per_step = BATCH_TOKENS // SEQ
    start = seed * job.get("data_steps", steps) * per_step  # a shorter equal-time run reads the start of its seed's slice
    train = data["train"][start:start + steps * per_step].long()
    if train.size(0) < steps * per_step:
        raise SystemExit(f"cached batches hold too few rows for seed {seed}: rerun with --fresh")
    vocab = data["vocab_size"]
    torch.manual_seed(1000 + seed)
    if job["variant"] in NANOCHAT_ARMS:
        model, opts, set_sched = build_nanochat(job, shape, vocab, steps)
    else:
        model, opts, set_sched = build_ours(job, shape, vocab, steps)
    times, cpu_times, losses = [], [], []
    for step in range(steps):
        set_sched(step)
        rows = train[step * per_step:(step + 1) * per_step]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # one thread: a step's seconds on a core of its own
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    model.eval()
    val = data["val"].long()
    bpb = bits_per_byte(model, val[:, :, :-1].contiguous(), val[:, :, 1:].contiguous(), data["token_bytes"])
    return dict(bpb=bpb, step_s=statistics.median(times[2:]) if len(times) > 2 else times[-1],
                cpu_step_s=statistics.median(cpu_times[2:]) if len(cpu_times) > 2 else cpu_times[-1],
                final_loss=losses[-1], losses=losses, rss_mib=peak_rss_mib())


def peak_rss_mib():
    """This process's own peak RSS (VmHWM; getrusage's maxrss would carry the parent's over fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def model_config(shape, vocab, overrides):
    from nanochat.gpt import config_from_depth
    c = config_from_depth(shape["depth"], vocab, SEQ, aspect_ratio=shape["width"] // shape["depth"],
                          head_dim=shape["head_dim"])
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def build_ours(job, shape, vocab, steps):
    from nanochat.gpt import GPT
    from nanochat.train_loop import lr_multiplier, muon_momentum, set_schedule
    spec = variant_spec(job["variant"], job["keep"])
    model = GPT(model_config(shape, vocab, spec["config"]))
    model.init_weights()
    opts = model.setup_optimizers(**LRS, **spec["optim"])
    s = spec["schedule"]

    def set_sched(step):
        mom = muon_momentum(step, steps, s["warmdown"], peak=0.97) if s["momentum"] else muon_momentum(step)
        wd = 0.5 * (1 + math.cos(math.pi * step / steps)) if s["wd_cosine"] else None
        set_schedule(opts, lr_multiplier(step, steps, 0.0, s["warmdown"], s["final_lr"]), mom, wd)
    return model, opts, set_sched


# nanochat's arms: its model and optimizer under three schedules. "nanochat" is what its scripts/base_train.py
# (92d63d4) computes for this shape and batch from its default flags (depth, --aspect-ratio, --head-dim,
# --max-seq-len 256, --total-batch-size 8192, --num-iterations): learning rates x sqrt(B / 2^19), Muon weight decay
# x sqrt(B / 2^19) x D_ref / D (D: 12 tokens per scaling parameter, D_ref the same for its depth-12 reference
# model), 40 warmup steps, warmdown over the last 65 % to 0.05, Muon momentum 0.85 -> 0.97 over 400 steps (falling
# to 0.90 over the warmdown only after step 400), weight decay a cosine to zero. "nanochat_tinylr" is this bench's
# arm until 2026-12-07: our tiny preset's learning rates, weight decay 0.28 and scalar lr 0.5 unscaled, no warmup,
# its warmdown, momentum falling to 0.90 over the warmdown from the start. "nanochat_oursched" runs our base_train's
# schedule (our learning rates, warmdown over the last 20 % to 0, momentum 0.85 -> 0.95 over 300 steps, weight
# decay 0.28 as a cosine): model and optimizer alone, on our schedule.
NANOCHAT_ARMS = {"nanochat": "karpathy/nanochat main, its own base_train schedule at this shape and batch",
                 "nanochat_tinylr": "nanochat main, our lrs, its schedule unscaled (the bench's arm to 2026-12-07)",
                 "nanochat_oursched": "nanochat main on our base_train's schedule and lrs"}
NANOCHAT_REF = dict(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.28,
                    warmup_steps=40, warmdown=0.65, final_lr=0.05, batch=2 ** 19, depth=12, data_ratio=12)


def nanochat_schedule(arm, model_of_depth, depth, steps, ours):
    """(setup_optimizer kwargs, step -> (lr multiplier, Muon momentum, Muon weight decay)) for a nanochat arm.
    model_of_depth(d): its GPT of depth d on the meta device (parameter counts for the scaling rules);
    ours: our (lr_multiplier, muon_momentum)."""
    ref = NANOCHAT_REF
    if arm == "nanochat":
        scaling = lambda m: m.num_scaling_params()["transformer_matrices"] + m.num_scaling_params()["lm_head"]
        tokens = int(ref["data_ratio"] * scaling(model_of_depth(depth)))  # its compute-optimal horizon, as it rounds it
        ref_tokens = ref["data_ratio"] * scaling(model_of_depth(ref["depth"]))
        lr_scale = (BATCH_TOKENS / ref["batch"]) ** 0.5
        kwargs = {k: ref[k] * lr_scale for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")}
        kwargs["weight_decay"] = ref["weight_decay"] * lr_scale * ref_tokens / tokens
        warmup, warmdown = ref["warmup_steps"], round(ref["warmdown"] * steps)
        momentum_falls_from = 400  # its momentum warms up over 400 steps before the warmdown may lower it
    elif arm == "nanochat_tinylr":
        kwargs = dict(**LRS, scalar_lr=ref["scalar_lr"], weight_decay=ref["weight_decay"])
        warmup, warmdown, momentum_falls_from = 0, round(ref["warmdown"] * steps), 0
    elif arm == "nanochat_oursched":
        lr_multiplier, muon_momentum = ours
        kwargs = dict(**LRS, scalar_lr=ref["scalar_lr"], weight_decay=ref["weight_decay"])
        return kwargs, lambda step: (lr_multiplier(step, steps), muon_momentum(step),
                                     kwargs["weight_decay"] * cosine(step, steps))
    else:
        raise ValueError(f"unknown nanochat arm {arm!r}")

    def at(step):
        if step < warmup:
            lrm = (step + 1) / warmup
        elif step <= steps - warmdown:
            lrm = 1.0
        else:
            progress = (steps - step) / warmdown
            lrm = progress + (1 - progress) * ref["final_lr"]
        mom = 0.85 + 0.12 * min(step / 400, 1)
        if step >= max(steps - warmdown, momentum_falls_from):
            mom = 0.97 + (0.90 - 0.97) * (step - (steps - warmdown)) / warmdown
        return lrm, mom, kwargs["weight_decay"] * cosine(step, steps)
    return kwargs, at


def cosine(step, steps):
    return 0.5 * (1 + math.cos(math.pi * step / steps))


def build_nanochat(job, shape, vocab, steps):
    """karpathy/nanochat's model and optimizer from a checkout (its package shadows ours in this process)."""
    from nanochat.train_loop import lr_multiplier, muon_momentum  # ours (the arm on our schedule), then theirs:
    for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
        del sys.modules[name]
    sys.path.insert(0, job["nanochat"])
    from nanochat.gpt import GPT, GPTConfig
    width, head_dim = shape["width"], shape["head_dim"]

    def model_of_depth(depth):  # as its base_train builds it: width depth x aspect ratio, its default window pattern
        n_embd = depth * (width // shape["depth"])
        cfg = GPTConfig(sequence_len=SEQ, vocab_size=vocab, n_layer=depth, n_head=n_embd // head_dim,
                        n_kv_head=n_embd // head_dim, n_embd=n_embd)
        with torch.device("meta"):
            return GPT(cfg)
    model = model_of_depth(shape["depth"])
    model.to_empty(device="cpu")
    model.init_weights()
    kwargs, at = nanochat_schedule(job["variant"], model_of_depth, shape["depth"], steps,
                                   (lr_multiplier, muon_momentum))
    opt = model.setup_optimizer(**kwargs)

    def set_sched(step):
        lrm, mom, wd = at(step)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = mom
                group["weight_decay"] = wd
    return model, [opt], set_sched


# ---------------------------------------------------------------------------------------------------------------
# the driver

def prepare_batches(path, steps, seeds):
    """Train rows for every seed's slice and the val rows, tokenized once with our tokenizer."""
    from nanochat.common import write_atomic
    from nanochat.dataloader import ROW_POOLS, tokenizing_distributed_data_loader
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    try:
        tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (the offline data and tokenizer: `bash speedrun.sh compare` prepares both)")
    per_step = BATCH_TOKENS // SEQ
    print(f"tokenizing {steps * seeds * per_step * SEQ:,} train and {VAL_BATCHES * BATCH_TOKENS:,} val tokens...", flush=True)

    def rows(split, n):
        out = []
        packing = dict(packing="rows", pools=ROW_POOLS) if split == "train" else {}  # train as base_train does
        for x, y, *_ in tokenizing_distributed_data_loader(per_step, SEQ, split, tokenizer, rank=0, world_size=1, **packing):
            out.append(torch.cat([x, y[:, -1:]], dim=1).to(torch.int32))  # SEQ + 1 tokens per row
            if len(out) == n:
                return torch.cat(out) if split == "train" else torch.stack(out)
    data = dict(train=rows("train", steps * seeds), val=rows("val", VAL_BATCHES), token_bytes=token_bytes,
                vocab_size=tokenizer.get_vocab_size())
    write_atomic(path, lambda f: torch.save(data, f))


def launch(job):
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), TORCHDYNAMO_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "bench.bench_model", "--run-one", json.dumps(job)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc, job):
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"run {job['variant']} seed {job['seed']} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_all(jobs, results, results_path, parallel):
    """Run the jobs not cached yet, `parallel` at a time, saving results after each."""
    todo = [j for j in jobs if key(j) not in results]
    running = []
    t_start = time.time()
    done = 0
    while todo or running:
        while todo and len(running) < parallel:
            j = todo.pop(0)
            running.append((launch(j), j))
        proc, job = running.pop(0)
        results[key(job)] = collect(proc, job)
        done += 1
        r = results[key(job)]
        print(f"  [{done}/{done + len(todo) + len(running)}] {job['variant']:9s} seed {job['seed']}: val bpb {r['bpb']:.4f} "
              f"(loss {r['final_loss']:.3f}, {BATCH_TOKENS / r['step_s']:,.0f} tok/s at 1 thread, "
              f"{BATCH_TOKENS / r.get('cpu_step_s', float('nan')):,.0f} per CPU second, "
              f"{r['rss_mib']:.0f} MiB) {time.time() - t_start:.0f} s", flush=True)
        save(results, results_path)


def save(results, path):
    from nanochat.common import write_atomic  # ours (a job may have imported another nanochat: not in this process)
    write_atomic(path, json.dumps(results))


def key(job):
    tag = ",".join(job["keep"]) if job["variant"] == "all" else "own" if job["variant"] == "nanochat" else ""
    return f"{job['variant']}[{tag}]/seed{job['seed']}/steps{job['steps']}"


def speed(variants, keep, shape, rounds, nanochat, batches, steps, threads, cache):
    """Tokens/s per variant with the machine's threads: each measurement is a process of its own (10 steps, the
    median of the last 8), the variants alternating in rotating order for `rounds` rounds; median per variant.
    (Several models stepped in turn inside one process measured identical models up to 10 % apart.) `cache`
    holds earlier passes' measurements by the same key (--fresh drops them)."""
    name = f"{','.join(variants)}[{','.join(keep)}]"
    if len(cache.get(name, {}).get(variants[0], [])) >= rounds:
        return {v: statistics.median(t) for v, t in cache[name].items()}
    times = cache[name] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            job = dict(variant=v, seed=0, steps=min(10, steps), shape=shape, keep=keep, threads=threads,
                       batches=batches, nanochat=nanochat)
            times[v].append(BATCH_TOKENS / collect(launch(job), job)["step_s"])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v} {t[-1]:,.0f}" for v, t in times.items()), flush=True)
    return {v: statistics.median(t) for v, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description="Ablate model/optimizer changes: val bpb at equal tokens, tokens/s")
    parser.add_argument("--shape", choices=SHAPES, default="tiny", help="tiny: depth 2 width 128; d4w256: depth 4 width 256")
    parser.add_argument("--steps", type=int, default=60, help=f"optimizer steps of {BATCH_TOKENS:,} tokens per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default="base," + ",".join(CANDIDATES) + ",all",
                        help=f"comma-separated: base, all, {', '.join(NANOCHAT_ARMS)}, or candidates {','.join(CANDIDATES)}")
    parser.add_argument("--keep", default="", help="candidates that 'all' combines (default: those that pass the "
                                                   "keep rule in this run's results)")
    parser.add_argument("--nanochat", default="", help="path to a karpathy/nanochat checkout: its model as an arm "
                                                       "(nanochat: on its own schedule, unless --variants names its arms)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="tokens/s measurements per variant (0: skip)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs and batches")
    parser.add_argument("--run-one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return

    from nanochat.common import get_base_dir
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants + [k for k in args.keep.split(",") if k] if v not in CANDIDATES
               and v not in ("base", "all", *NANOCHAT_ARMS)]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from base, all, {', '.join(NANOCHAT_ARMS)}, "
                         f"{', '.join(CANDIDATES)}")
    if any(v in NANOCHAT_ARMS for v in variants) and not args.nanochat:
        raise SystemExit("error: the nanochat arms need --nanochat PATH (a checkout of karpathy/nanochat)")
    if args.nanochat:
        args.nanochat = os.path.abspath(os.path.expanduser(args.nanochat))
        if not os.path.exists(os.path.join(args.nanochat, "nanochat", "gpt.py")):
            raise SystemExit(f"error: --nanochat {args.nanochat} is not a karpathy/nanochat checkout (no nanochat/gpt.py)")
        variants += [] if any(v in NANOCHAT_ARMS for v in variants) else ["nanochat"]
    if args.steps < 3 or args.seeds < 1:
        raise SystemExit("error: --steps must be at least 3 and --seeds at least 1")
    out_dir = os.path.join(get_base_dir(), "bench", "model", f"{args.shape}_rows")  # results of streamed batches stay apart
    os.makedirs(out_dir, exist_ok=True)
    batches = os.path.join(out_dir, f"batches_{args.steps}x{args.seeds}.pt")
    if args.fresh or not os.path.exists(batches):
        prepare_batches(batches, args.steps, args.seeds)
    results_path = os.path.join(out_dir, "results.json")
    results = {} if args.fresh or not os.path.exists(results_path) else json.load(open(results_path))

    def jobs_for(names, keep):
        return [dict(variant=v, seed=s, steps=args.steps, shape=args.shape, keep=keep, threads=1, batches=batches,
                     nanochat=args.nanochat) for s in range(args.seeds) for v in names]

    print(f"shape {args.shape} {SHAPES[args.shape]}, {args.steps} steps x {BATCH_TOKENS:,} tokens, {args.seeds} seeds, "
          f"{args.jobs} at a time", flush=True)
    singles = [v for v in variants if v != "all"]
    run_all(jobs_for(singles, []), results, results_path, args.jobs)
    bpbs = lambda v, keep=(): [results[key(dict(variant=v, seed=s, steps=args.steps, keep=list(keep)))]["bpb"]
                               for s in range(args.seeds)]
    base = bpbs("base") if "base" in singles else None
    rows = []

    def stats(v, keep=()):
        b = bpbs(v, keep)
        mean = statistics.mean(b)
        sd = statistics.stdev(b) if len(b) > 1 else float("nan")
        if base is None or v == "base":
            return mean, sd, float("nan"), float("nan")
        diffs = [x - y for x, y in zip(b, base)]  # paired: the same seed means the same data and init stream
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        return mean, sd, statistics.mean(diffs), se

    for v in singles:
        rows.append((v, *stats(v)))
    # the keep rule: a bpb gain beyond seed noise, then tokens/s (measured for those candidates only)
    gains = [v for v, mean, sd, diff, se in rows if v in CANDIDATES and diff < -2 * se]
    threads = os.cpu_count()
    tok_s = {}
    if args.speed_rounds and base is not None:
        print(f"tokens/s of base, the candidates that lower bpb ({', '.join(gains) or 'none'}) and nanochat, "
              f"{threads} threads...", flush=True)
        arms = [v for v in singles if v in NANOCHAT_ARMS][:1]  # its arms differ in schedule only: one measurement
        tok_s = speed(["base"] + gains + arms, [], args.shape,
                      args.speed_rounds, args.nanochat, batches, args.steps, threads, results.setdefault("speed", {}))
    keep = [k for k in args.keep.split(",") if k]
    equal_time = {}  # a slower candidate may still pay for itself: fewer steps, in proportion, must still beat base
    if not keep:
        for v in gains:
            if not tok_s or tok_s[v] >= 0.97 * tok_s["base"]:
                keep.append(v)
                continue
            n = round(args.steps * tok_s[v] / tok_s["base"])
            jobs = [dict(j, steps=n, data_steps=args.steps) for j in jobs_for([v], [])]
            print(f"{v}: {tok_s[v] / tok_s['base'] - 1:+.1%} tokens/s; at equal wall time it takes {n} steps", flush=True)
            run_all(jobs, results, results_path, args.jobs)
            diffs = [results[key(j)]["bpb"] - b for j, b in zip(jobs, base)]
            equal_time[v] = (n, statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0)
            if equal_time[v][1] < -2 * equal_time[v][2]:
                keep.append(v)
    if "all" in variants and keep:
        run_all(jobs_for(["all"], keep), results, results_path, args.jobs)
        rows.append(("all", *stats("all", keep)))
        if args.speed_rounds and base is not None:  # against base again, in a pass of their own
            pair = speed(["base", "all"], keep, args.shape, args.speed_rounds, "", batches, args.steps, threads,
                         results.setdefault("speed", {}))
            tok_s["all"] = pair["all"] * tok_s["base"] / pair["base"]

    # the table
    lines = [f"# Model ablation: {args.shape} {SHAPES[args.shape]}, {args.steps} steps x {BATCH_TOKENS:,} tokens, "
             f"{args.seeds} seeds", "",
             f"kept (lower mean val bpb than base by more than 2 standard errors, tokens/s within 3 % or still lower "
             f"at equal wall time): {', '.join(keep) or 'none'}", "",
             "| variant | change | val bpb mean | sd | vs base (paired) | 2 SE | tokens/s | vs base | tokens/s per CPU second | peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, mean, sd, diff, se in rows:
        labels = {"base": "the old defaults (first release)", **NANOCHAT_ARMS, "all": "+".join(keep)}
        what = CANDIDATES[v][0] if v in CANDIDATES else labels[v]
        ks = [results[key(dict(variant=v, seed=s, steps=args.steps, keep=keep if v == "all" else []))]
              for s in range(args.seeds)]
        rss = max(r["rss_mib"] for r in ks)
        ts = tok_s.get(v)
        rel = f"{ts / tok_s['base'] - 1:+.1%}" if ts and "base" in tok_s else ""
        cpu = [BATCH_TOKENS / r["cpu_step_s"] for r in ks if "cpu_step_s" in r]  # runs from before it was recorded: none
        lines.append(f"| {v} | {what} | {mean:.4f} | {sd:.4f} | {diff:+.4f} | {2 * se:.4f} | "
                     f"{f'{ts:,.0f}' if ts else ''} | {rel} | {f'{statistics.median(cpu):,.0f}' if cpu else ''} | {rss:.0f} |")
    for v, (n, diff, se) in equal_time.items():
        lines.insert(3, f"- {v} at equal wall time ({n} steps): {diff:+.4f} bpb vs base (2 SE {2 * se:.4f}): "
                        f"{'kept, it pays for its cost' if v in keep else 'dropped'}")
    if any(v == "all" for v, *_ in rows):  # nanochat against our defaults, paired by seed as against base
        ours, arms = bpbs("all", keep), [v for v, *_ in rows if v in NANOCHAT_ARMS]
        lines += [""] if arms else []
        for v in arms:
            diffs = [x - y for x, y in zip(bpbs(v), ours)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            lines.append(f"- {v} vs all (paired): {statistics.mean(diffs):+.4f} bpb (2 SE {2 * se:.4f})")
    lines += ["", f"Machine: {os.cpu_count()} CPU threads; bpb runs one thread each, {args.jobs} at once; tokens/s with "
              f"{os.cpu_count()} threads, one process per measurement, median of {args.speed_rounds} rounds ('all': "
              f"scaled by base's figure from its own pass); tokens/s per CPU second: the bpb runs' own steps (one thread, "
              f"the median step's process CPU time, median over seeds; steady under load where wall time is not); "
              f"peak RSS: a bpb run's VmHWM."]
    table = "\n".join(lines) + "\n"
    save(results, results_path)  # with the tokens/s measurements
    with open(os.path.join(out_dir, f"ablation_{args.steps}.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"written to {out_dir}")


if __name__ == "__main__":
    main()
