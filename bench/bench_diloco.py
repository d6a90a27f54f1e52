"""
DDP vs DiLoCo on the same token budget: final val bpb, the bpb gap, bytes communicated across workers (and
the ratio to DDP, checked against the exact expected figure), wall time, and the inner-step overhead of the
sync wrapper against plain local training.

    python -m bench.bench_diloco                                     # tiny preset, DDP + DiLoCo H in {10, 50, 100}
    python -m bench.bench_diloco --num-iterations 100 --hs 10 --compressions bf16,int8
    python -m bench.bench_diloco --preset d20 --nproc 8              # any unknown flag goes to scripts.base_train

Every arm is one `torchrun -m scripts.base_train` run with the same seed, data order and number of steps;
the only eval is the final one (`--eval-every 0`), so DiLoCo syncs exactly every H steps and its outer
bytes are DDP's bytes / H exactly when the steps are a multiple of H. Bytes across workers are the payload
each rank hands to its collectives, summed over ranks: for DDP the fp32 gradient all-reduce (4 bytes x P
parameters per step per rank), for DiLoCo (one worker per rank) the outer all-reduce of the pseudo-gradient
(4P fp32, 2P bf16, P + 4 bytes per tensor int8 because of its fp32 per-tensor scales) per sync per rank.

The wrapper overhead is measured in this process: rounds of H inner steps of (a) plain local training,
(b) the same driven by DiLoCoSync with one worker (one outer step per H inner steps, so amortised over H)
and (c) DDPSync, alternating step by step in rotating order; a round is H steps of each, its ratios are the
arms' total times, and the median over rounds is reported. The outer step alone is also timed directly.
With one worker nothing is communicated: this is the wrapper's own compute (pseudo-gradient, outer SGD, copy).
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from diloco import add_sync_args, make_sync, make_worker_groups
from nanochat.checkpoint import checkpoint_dir
from nanochat.common import autocast_context, autodetect_device_type, get_base_dir, synchronize
from nanochat.dataset import list_parquet_files
from nanochat.gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_PER_PARAM = {"none": 4, "bf16": 2, "int8": 1}

parser = argparse.ArgumentParser(description="Benchmark DiLoCo against DDP: bpb gap, bytes, wall time, wrapper overhead",
                                 epilog="Any other flag is passed on to scripts.base_train for every arm "
                                        "(e.g. --preset d20 --device-batch-size 8).")
parser.add_argument("--num-iterations", type=int, default=300, help="optimizer steps per arm (same tokens for all)")
parser.add_argument("--hs", default="10,50,100", help="DiLoCo inner steps between syncs, comma-separated")
parser.add_argument("--compressions", default="none", help="outer compressions (none,bf16,int8), each run at every H")
parser.add_argument("--nproc", type=int, default=2, help="processes per arm (DDP ranks = DiLoCo workers)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("--overhead-h", type=int, default=0, help="H of the overhead measurement (default: the smallest H)")
parser.add_argument("--overhead-rounds", type=int, default=5, help="interleaved rounds of the overhead measurement (0: skip)")
parser.add_argument("--out", default="", help="directory for diloco.json, diloco.md and the logs (default: base_dir/bench)")
args, train_args = parser.parse_known_args()

hs = [int(h) for h in args.hs.split(",") if h]
compressions = [c for c in args.compressions.split(",") if c]
for c in compressions:
    if c not in BYTES_PER_PARAM:
        raise SystemExit(f"error: unknown compression {c!r}, expected some of {','.join(BYTES_PER_PARAM)}")
N, W = args.num_iterations, args.nproc
if not hs or W < 2:
    raise SystemExit("error: need at least one H (--hs) and --nproc >= 2 (DDP on one process communicates nothing)")
for h in hs:
    if N % h:
        print(f"note: {N} steps is not a multiple of H={h}: the final eval forces one extra outer sync")
base_dir = get_base_dir()
out_dir = args.out or os.path.join(base_dir, "bench")
os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
device_type = args.device_type or autodetect_device_type()
if not list_parquet_files():
    raise SystemExit(f"error: no pretraining shards in {base_dir}: run `python -m nanochat.dataset offline` "
                     "(or `download`), then `python -m scripts.tok_train --vocab-size 4096`")
if not os.path.exists(os.path.join(base_dir, "tokenizer", "token_bytes.pt")):
    raise SystemExit(f"error: no tokenizer in {base_dir}: run `python -m scripts.tok_train --vocab-size 4096`")


def run_arm(name, h, compression):
    """One training run under torchrun; returns its final checkpoint meta, metrics, wall time and exit code."""
    tag = f"bench_{name}"
    shutil.rmtree(checkpoint_dir("base", tag), ignore_errors=True)  # never read a previous run's figures
    sync = ["--sync", "ddp"] if h is None else ["--sync", "diloco", "--diloco-h", str(h),
                                                "--outer-compression", compression]
    device = ["--device-type", args.device_type] if args.device_type else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W}",
           "-m", "scripts.base_train", "--preset", "tiny", "--num-iterations", str(N), "--seed", str(args.seed),
           "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--model-tag", tag,
           *sync, *device, *train_args]
    log_path = os.path.join(out_dir, "logs", f"{name}.log")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank, as the tiny preset was sized
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    ckpt = checkpoint_dir("base", tag)
    meta_path = os.path.join(ckpt, f"step_{N:06d}", "meta.json")  # written last, atomically: complete if present
    if rc != 0 and not os.path.exists(meta_path):
        with open(log_path) as f:
            sys.stderr.write(f.read()[-3000:])
        raise SystemExit(f"error: arm {name} failed (exit {rc}): see {log_path}")
    if rc != 0:  # the run finished and saved; something failed at teardown: keep the figures, say so
        print(f"  warning: {name} exited with code {rc} after saving its final checkpoint: see {log_path}")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return meta, metrics, wall, rc


def model_size(meta):
    """(parameters, tensors) of the trained model, from its saved config."""
    with torch.device("meta"):
        params = list(GPT(GPTConfig(**meta["model_config"])).parameters())
    return sum(p.numel() for p in params), len(params)


def expected_bytes(h, compression, P, n):
    """Exact bytes across workers, summed over the W ranks (DiLoCo: one worker per rank)."""
    if h is None:
        return N * W * 4 * P  # fp32 gradient all-reduce every step
    per_sync = BYTES_PER_PARAM[compression] * P + (4 * n if compression == "int8" else 0)
    return math.ceil(N / h) * W * per_sync


def measure_overhead(meta, h, rounds):
    """Median per-round time ratios of DiLoCoSync / plain and DDPSync / plain inner steps (one process)."""
    torch.set_num_threads(1)  # as one rank of the tiny preset
    device = torch.device(device_type)
    autocast = autocast_context(device_type)
    cfg, u = GPTConfig(**meta["model_config"]), meta["user_config"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, u["device_batch_size"], cfg.sequence_len), generator=gen).to(device)
               for _ in range(4)]

    def build(sync_mode):
        torch.manual_seed(args.seed)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device=device)
        model.init_weights()
        opts = model.setup_optimizers(unembedding_lr=u["unembedding_lr"], embedding_lr=u["embedding_lr"],
                                      matrix_lr=u["matrix_lr"], weight_decay=u["weight_decay"])
        if sync_mode is None:  # (a) plain local training: exactly what a script without the wrapper does
            def step():
                for opt in opts:
                    opt.step()
                model.zero_grad(set_to_none=True)
            return model, step, None
        sync_args = add_sync_args(argparse.ArgumentParser()).parse_args(["--sync", sync_mode, "--diloco-h", str(h)])
        sync = make_sync(sync_args, model, opts, make_worker_groups(sync_args))
        return model, sync.step, sync

    arms = {"plain": build(None), "diloco": build("diloco"), "ddp": build("ddp")}

    def timed_step(name, i):
        model, step, _ = arms[name]
        x, y = batches[i % len(batches)]
        synchronize(device_type)
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        step()
        synchronize(device_type)
        return time.perf_counter() - t0

    def round_times(r):
        """Seconds per arm over H inner steps, the arms alternating step by step (rotating order) so that a
        change of machine load hits them alike; DiLoCo's H steps contain exactly one outer step."""
        order = list(arms)[r % 3:] + list(arms)[:r % 3]
        totals = dict.fromkeys(arms, 0.0)
        for i in range(h):
            for name in order:
                totals[name] += timed_step(name, i)
        return totals

    round_times(0)  # warm-up
    rounds_ = [round_times(r + 1) for r in range(rounds)]
    sync = arms["diloco"][2]
    syncs_in_rounds = sync.num_syncs  # one per round (warm-up included): the outer step really ran
    outer = []
    for _ in range(5):  # the outer step alone (pseudo-gradient, outer SGD, copy back), timed directly
        synchronize(device_type)
        t0 = time.perf_counter()
        sync.outer_step()
        synchronize(device_type)
        outer.append(time.perf_counter() - t0)
    plain_ms = 1000 * statistics.median(t["plain"] for t in rounds_) / h
    outer_ms = 1000 * statistics.median(outer)
    return {
        "h": h, "rounds": rounds, "batch": [u["device_batch_size"], cfg.sequence_len], "device": device_type,
        "ms_per_step": {name: 1000 * statistics.median(t[name] for t in rounds_) / h for name in arms},
        "diloco_over_plain": statistics.median(t["diloco"] / t["plain"] for t in rounds_),
        "ddp_over_plain": statistics.median(t["ddp"] / t["plain"] for t in rounds_),
        "outer_step_ms": outer_ms, "outer_step_amortised_frac": outer_ms / (h * plain_ms),
        "outer_syncs": syncs_in_rounds,
    }


# Training arms: DDP first (the baseline), then every H x compression
arm_specs = [("ddp", None, "none")] + [(f"diloco_h{h}" + ("" if c == "none" else f"_{c}"), h, c)
                                       for h in hs for c in compressions]
results, metas = [], {}
for name, h, compression in arm_specs:
    print(f"running {name}: {N} steps on {W} processes ...", flush=True)
    meta, metrics, wall, rc = run_arm(name, h, compression)
    metas[name] = meta
    P, n = model_size(meta)
    measured = meta["inner_bytes"] if h is None else meta["outer_bytes"]
    expected = expected_bytes(h, compression, P, n)
    results.append({
        "arm": name, "sync": meta["sync"], "h": h, "compression": compression if h else None,
        "val_bpb": meta["val_bpb"], "tokens": meta["tokens"], "steps": N, "params": P, "tensors": n,
        "inner_bytes": meta["inner_bytes"], "outer_bytes": meta["outer_bytes"], "bytes_across_workers": measured,
        "expected_bytes": expected, "bytes_check": "PASS" if measured == expected else "FAIL",
        "bytes_per_token": measured / meta["tokens"], "train_seconds": meta["train_seconds"], "wall_seconds": wall,
        "exit_code": rc,
        "loss_curve": [[m["step"], m["loss"]] for m in metrics if "loss" in m],
    })
    print(f"  val bpb {meta['val_bpb']:.4f} | {measured:,} B across workers (expected {expected:,}: "
          f"{results[-1]['bytes_check']}) | {wall:.0f} s", flush=True)
ddp = results[0]
for r in results:
    r["bpb_gap_pct"] = 100 * (r["val_bpb"] - ddp["val_bpb"]) / ddp["val_bpb"]
    r["ratio_ddp_over_arm"] = ddp["bytes_across_workers"] / r["bytes_across_workers"]
    r["expected_ratio"] = ddp["expected_bytes"] / r["expected_bytes"]

overhead = None
if args.overhead_rounds > 0:
    oh = args.overhead_h or min(hs)
    print(f"measuring the wrapper overhead: {args.overhead_rounds} rounds of {oh} steps per arm ...", flush=True)
    overhead = measure_overhead(metas["ddp"], oh, args.overhead_rounds)  # the model the arms trained

# Report: table on stdout, markdown + JSON next to the logs
P, n = ddp["params"], ddp["tensors"]
lines = [f"DiLoCo vs DDP: {N} steps x {ddp['tokens'] // N:,} tokens = {ddp['tokens']:,} tokens per arm, {W} processes "
         f"({W} DiLoCo workers), {P:,} parameters in {n} tensors, device {device_type}, seed {args.seed}", "",
         "| arm | val bpb | gap vs DDP | bytes across workers | bytes/token | ratio DDP/arm | expected ratio | bytes check "
         "| train s | wall s |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
for r in results:
    lines.append(f"| {r['arm']} | {r['val_bpb']:.4f} | {r['bpb_gap_pct']:+.2f}% | {r['bytes_across_workers']:,} | "
                 f"{r['bytes_per_token']:,.2f} | {r['ratio_ddp_over_arm']:.4f} | {r['expected_ratio']:.4f} | "
                 f"{r['bytes_check']} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
lines += ["", f"Expected bytes (summed over ranks): DDP = steps x {W} x 4P; DiLoCo = syncs x {W} x per-sync payload, "
          f"4P (none, ratio H), 2P (bf16, ratio 2H), P + 4n (int8: one fp32 scale per tensor, ratio 4H x P/(P+4n) = "
          f"4H x {P / (P + 4 * n):.6f}). 'bytes check' compares the measured bytes with that exact figure."]
if overhead:
    ms = overhead["ms_per_step"]
    lines += ["", f"Wrapper inner-step overhead (one process, {overhead['rounds']} rounds of H={overhead['h']} steps per arm, "
              f"alternating step by step, batch {overhead['batch'][0]}x{overhead['batch'][1]}, median of per-round ratios): "
              f"DiLoCoSync/plain {overhead['diloco_over_plain']:.4f}, DDPSync/plain {overhead['ddp_over_plain']:.4f} "
              f"(target <= 1.02); ms/step plain {ms['plain']:.1f}, diloco {ms['diloco']:.1f}, ddp {ms['ddp']:.1f}. "
              f"The outer step alone takes {overhead['outer_step_ms']:.1f} ms, i.e. "
              f"{100 * overhead['outer_step_amortised_frac']:.2f}% of a plain inner step once amortised over H."]
table = "\n".join(lines)
print("\n" + table)


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


write_atomic(os.path.join(out_dir, "diloco.md"), table + "\n")
write_atomic(os.path.join(out_dir, "diloco.json"), json.dumps(
    {"num_iterations": N, "nproc": W, "hs": hs, "compressions": compressions, "seed": args.seed,
     "train_args": train_args, "arms": results, "overhead": overhead}, indent=2))
print(f"\nwrote {os.path.join(out_dir, 'diloco.json')} and diloco.md")
if any(r["bytes_check"] == "FAIL" for r in results):
    raise SystemExit("error: measured bytes differ from the expected figures (see 'bytes check')")
