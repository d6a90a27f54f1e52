"""
DDP vs DiLoCo on the same token budget: final val bpb, the bpb gap (against DDP and against plain DiLoCo at
the same H), bytes communicated across workers (checked against the exact expected figure), peak bytes per
sync event, wall time, time blocked on the link, whether overlap hides a slow link, and the inner-step
overhead of the sync wrapper against plain local training.

    python -m bench.bench_diloco      # tiny preset: DDP; H in {50, 100} x codecs none/int8/int4/topk/dct/sparseloco and
                                      # Streaming DiLoCo (F, tau) in {(1, 1), (4, 0), (4, 1)}; overlap check
    python -m bench.bench_diloco --num-iterations 100 --hs 10 --compressions bf16,int8 --streaming ""
    python -m bench.bench_diloco --preset d20 --nproc 8              # any unknown flag goes to scripts.base_train
    python -m bench.bench_diloco --sweep --num-iterations 400         # outer lr x momentum x H x workers, SparseLoCo's
                                                                      # H x density x decay x outer lr, and recipes

--sweep trains DDP and every point of the grid --sweep-lrs x --sweep-momenta x --sweep-hs x --sweep-workers
(48 runs by default), then SparseLoCo's grid --sweep-sparse-hs x --sweep-sparse-densities x --sweep-sparse-decays
x --sweep-sparse-lrs (codec sparseloco, 2 bits, chunks of 4096, --nproc workers: 36 runs by default), then the
--recipes (drift-aware variants and compressed exchanges), and ranks them by val bpb with their bytes across
workers: which settings close DiLoCo's gap to DDP at which communication. sweep.png plots every run's bytes
across workers over DDP's (log x) against its val bpb gap to DDP, the Pareto front (no other run has fewer bytes
and no larger gap) marked, as is the `front` column of the table.
A finished run with the same flags is never run twice (an interrupted sweep continues where it stopped);
--sweep --sweep-finished writes the table of the runs finished so far and runs nothing (a sweep spread over
several sessions).

Every arm is one `torchrun -m scripts.base_train` run with the same seed, data order and number of steps;
the only eval is the final one (`--eval-every 0`). Each fragment syncs every H steps (staggered by H/F), plus
once more at the end of training if it took steps since its last exchange landed. Bytes across workers are
what each rank sends on the wire (nanochat/comm.py's ring model), summed over ranks: for DDP the fp32 gradient
all-reduce (2 (W-1)/W x 4P per step per rank), for DiLoCo (one worker per rank) the outer exchange of the
pseudo-gradient through its codec (diloco/codecs.py: codec.wire_bytes(W) per sync per rank).

The wrapper overhead is measured in this process: rounds of H inner steps of (a) plain local training,
(b) the same driven by DiLoCoSync with one worker (one outer step per H inner steps, so amortised over H)
and (c) DDPSync, alternating step by step in rotating order; a round is H steps of each, its ratios are the
arms' total times, and the median over rounds is reported. The outer step alone is also timed directly.
With one worker nothing is communicated: this is the wrapper's own compute (pseudo-gradient, outer SGD, copy).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from diloco import SyncConfig, make_sync, make_worker_groups
from diloco.codecs import CODECS, add_codec_args, make_codec
from diloco.fragments import split_into_fragments
from diloco.recipes import RECIPES
from nanochat.checkpoint import checkpoint_dir
from nanochat.common import autocast_context, autodetect_device_type, device_synchronize, get_base_dir, write_atomic
from nanochat.dataset import list_parquet_files
from nanochat.gpt import GPTConfig, gpt_on_meta
from scripts.flags import codec_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


parser = argparse.ArgumentParser(description="Benchmark DiLoCo against DDP: bpb gap, bytes, wall time, wrapper overhead",
                                 epilog="Any other flag is passed on to scripts.base_train for every arm "
                                        "(e.g. --preset d20 --device-batch-size 8).")
parser.add_argument("--num-iterations", type=int, default=300, help="optimizer steps per arm (same tokens for all)")
parser.add_argument("--hs", default="50,100", help="DiLoCo inner steps between syncs, comma-separated")
parser.add_argument("--compressions", default="none,int8,int4,topk,dct,sparseloco",
                    help=f"outer codecs ({','.join(CODECS)}), each run at every H")
parser.add_argument("--streaming", default="1:1,4:0,4:1",
                    help="Streaming DiLoCo arms F:TAU (fragments:overlap), codec none, each run at every H ('' = none)")
parser.add_argument("--overlap-delay-ms", type=float, default=300.0,
                    help="overlap check: short runs (H=2) with each outer collective slowed by this much, blocking "
                         "(tau 0) and overlapped (tau 1), against no delay (0: skip)")
parser.add_argument("--overlap-steps", type=int, default=20, help="steps of each overlap-check run")
parser.add_argument("--reuse", action="store_true",
                    help="take an arm's figures from its finished checkpoint when it was run with the same flags "
                         "(continues an interrupted bench; its wall time is then unknown)")
parser.add_argument("--nproc", type=int, default=2, help="processes per arm (DDP ranks = DiLoCo workers)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("--overhead-h", type=int, default=0, help="H of the overhead measurement (default: the smallest H)")
parser.add_argument("--overhead-rounds", type=int, default=5, help="interleaved rounds of the overhead measurement (0: skip)")
parser.add_argument("--out", default="", help="directory for diloco.json, diloco.md and the logs (default: base_dir/bench)")
parser.add_argument("--sweep", action="store_true", help="the hyper-parameter sweep and the recipes instead of the arms above")
parser.add_argument("--sweep-lrs", default="0.4,0.7,1.0", help="outer learning rates of the sweep")
parser.add_argument("--sweep-momenta", default="0.8,0.9", help="outer Nesterov momenta of the sweep")
parser.add_argument("--sweep-hs", default="10,25,50,100", help="H of the sweep")
parser.add_argument("--sweep-workers", default="2,4", help="DiLoCo workers of the sweep (one process each)")
parser.add_argument("--sweep-sparse-hs", default="10,25,50", help="H of the SparseLoCo grid ('' = no SparseLoCo grid)")
parser.add_argument("--sweep-sparse-densities", default="0.01,0.02,0.03",
                    help="SparseLoCo grid: fractions of each chunk of 4096 sent (--outer-sparseloco-density)")
parser.add_argument("--sweep-sparse-decays", default="0.9,0.95", help="SparseLoCo grid: error-feedback decays")
parser.add_argument("--sweep-sparse-lrs", default="0.7,1.0", help="SparseLoCo grid: outer learning rates")
parser.add_argument("--sweep-finished", action="store_true",
                    help="with --sweep: rank the runs finished so far and name the others; train nothing")
parser.add_argument("--recipes", default="final_average,lr_warmup,h10_int4,h10_int4_average,sparseloco",
                    help=f"recipes (diloco/recipes.py) run after the grid at H 50, 2 workers, from: {', '.join(RECIPES)} "
                         "('' = none)")
args, train_args = parser.parse_known_args()

hs = [int(h) for h in args.hs.split(",") if h]
compressions = [c for c in args.compressions.split(",") if c]
for c in compressions:
    if c not in CODECS:
        raise SystemExit(f"error: unknown compression {c!r}, expected some of {','.join(CODECS)}")
try:
    streaming = [tuple(int(v) for v in spec.split(":")) for spec in args.streaming.split(",") if spec]
    assert all(len(spec) == 2 for spec in streaming)
except (ValueError, AssertionError):
    raise SystemExit(f"error: --streaming {args.streaming!r}: expected F:TAU pairs, e.g. 4:0,4:1") from None
N, W = args.num_iterations, args.nproc
if not hs or W < 2:
    raise SystemExit("error: need at least one H (--hs) and --nproc >= 2 (DDP on one process communicates nothing)")
base_dir = get_base_dir()
out_dir = args.out or os.path.join(base_dir, "bench")
os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
device_type = args.device_type or autodetect_device_type()
if not list_parquet_files():
    raise SystemExit(f"error: no pretraining shards in {base_dir}: run `python -m nanochat.dataset offline` "
                     "(or `download`), then `python -m scripts.tok_train --vocab-size 4096`")
if not os.path.exists(os.path.join(base_dir, "tokenizer", "token_bytes.pt")):
    raise SystemExit(f"error: no tokenizer in {base_dir}: run `python -m scripts.tok_train --vocab-size 4096`")


def diloco_flags(h, compression, fragments=1, overlap=0):
    return ["--sync", "diloco", "--diloco-h", str(h), "--outer-compression", compression,
            "--diloco-fragments", str(fragments), "--diloco-overlap", str(overlap)]


def saved_run(name, steps):
    """(meta, metrics) of this arm's run if its final step was saved, else None."""
    ckpt = checkpoint_dir("base", f"bench_{name}")
    meta_path = os.path.join(ckpt, f"step_{steps:06d}", "meta.json")  # written last, atomically: complete if present
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return meta, [json.loads(line) for line in f]


def finished_run(name, sync, steps=None, nproc=None):
    """(final checkpoint meta, metrics) of a finished run of this arm with the same flags, or None."""
    steps, nproc = steps or N, nproc or W
    saved = saved_run(name, steps)
    if saved is None:
        return None
    meta = saved[0]
    flags = dict(zip(sync[::2], sync[1::2]))
    want = {"num_iterations": steps, "seed": args.seed, "sync": flags["--sync"],
            **{k.removeprefix("--").replace("-", "_"): v for k, v in flags.items() if k != "--sync"}}
    if meta["world_size"] != nproc or any(not same_flag(meta["user_config"].get(k), v) for k, v in want.items()):
        return None
    return saved


def same_flag(saved, given):
    """A saved config value against the flag's text: numbers by value (a saved 0.0 is the flag `0`)."""
    try:
        return float(saved) == float(given)
    except (TypeError, ValueError):
        return str(saved) == str(given)


def run_arm(name, sync, steps=None, nproc=None, reuse=None):
    """One training run under torchrun on nproc processes (default --nproc); returns its final checkpoint meta,
    metrics, wall time and exit code. reuse (default --reuse): take a finished run with the same flags."""
    steps, nproc = steps or N, nproc or W
    reuse = args.reuse if reuse is None else reuse
    ckpt = checkpoint_dir("base", f"bench_{name}")
    finished = finished_run(name, sync, steps, nproc) if reuse else None
    if finished:
        print(f"  reusing the finished run in {ckpt}", flush=True)
        return (*finished, float("nan"), 0)
    shutil.rmtree(ckpt, ignore_errors=True)  # never read a previous run's figures
    device = ["--device-type", args.device_type] if args.device_type else []
    # the tiny preset's 16 rows per micro-step are more than one of 4+ ranks takes per step: use what it takes
    rows = ["--device-batch-size", str(max(1, 32 // nproc))] if nproc > 2 and "--device-batch-size" not in train_args else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scripts.base_train", "--preset", "tiny", "--num-iterations", str(steps), "--seed", str(args.seed),
           "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--model-tag", f"bench_{name}",
           *sync, *rows, *device, *train_args]
    log_path = os.path.join(out_dir, "logs", f"{name}.log")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank, as the tiny preset was sized
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    saved = saved_run(name, steps)
    if saved is None:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-3000:])
        raise SystemExit(f"error: arm {name} failed (exit {rc}): see {log_path}")
    if rc != 0:  # the run finished and saved; something failed at teardown: keep the figures, say so
        print(f"  warning: {name} exited with code {rc} after saving its final checkpoint: see {log_path}")
    return (*saved, wall, rc)


def model_params(meta):
    """The trained model's parameters, in order, as shapes only (meta tensors), from its saved config."""
    return list(gpt_on_meta(GPTConfig.from_saved(meta["model_config"])).parameters())


def fragment_codecs(compression, fragments, params):
    """The codec of each fragment, as base_train builds them (any --outer-* in the passed-on flags count)."""
    codec_args = add_codec_args(argparse.ArgumentParser()).parse_known_args(["--outer-compression", compression,
                                                                             *train_args])[0]
    return [make_codec(codec_config(codec_args), [p.numel() for p in frag], "cpu") for frag in split_into_fragments(params, fragments)]


def exchanges(h, fragments, overlap, f):
    """How many exchanges fragment f makes in N steps: one per launch (at n = phase - overlap mod H), plus the
    final sync at the end of training when steps were taken since its last exchange landed (overlap steps after
    its launch) and none is in flight."""
    phase = round((f + 1) * h / fragments) % h
    launches = [n for n in range(1, N + 1) if n % h == (phase - overlap) % h]
    landed = launches[-1] + overlap if launches else 0
    return len(launches) + (0 if landed >= N else 1)


def expected_bytes(h, compression, params, fragments=1, overlap=0):
    """Exact bytes across workers, summed over the W ranks (DiLoCo: one worker per rank), and the peak bytes
    one rank sends in one sync event."""
    if h is None:  # fp32 gradient all-reduce every step (one per optimizer; the // is exact for W in 2, 4, 8)
        per_step = 2 * (W - 1) * 4 * sum(p.numel() for p in params) // W
        return N * W * per_step, per_step
    codecs = fragment_codecs(compression, fragments, params)
    total = sum(exchanges(h, fragments, overlap, f) * c.wire_bytes(W) for f, c in enumerate(codecs))
    return W * total, max(c.wire_bytes(W) for c in codecs)


def measure_overhead(meta, h, rounds):
    """Median per-round time ratios of DiLoCoSync / plain and DDPSync / plain inner steps (one process)."""
    torch.set_num_threads(1)  # as one rank of the tiny preset
    device = torch.device(device_type)
    autocast = autocast_context(device_type)
    cfg, u = GPTConfig.from_saved(meta["model_config"]), meta["user_config"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, u["device_batch_size"], cfg.sequence_len), generator=gen).to(device)
               for _ in range(4)]

    def build(sync_mode):
        torch.manual_seed(args.seed)
        model = gpt_on_meta(cfg)
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
        config = SyncConfig(mode=sync_mode, h=h)  # the flags' defaults otherwise
        sync = make_sync(config, model, opts, make_worker_groups(config))
        return model, sync.step, sync

    arms = {"plain": build(None), "diloco": build("diloco"), "ddp": build("ddp")}

    def timed_step(name, i):
        model, step, _ = arms[name]
        x, y = batches[i % len(batches)]
        device_synchronize(device_type)
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        step()
        device_synchronize(device_type)
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
    for _ in range(5):  # the outer step alone (pseudo-gradient, exchange, outer SGD, copy back), timed directly
        device_synchronize(device_type)
        t0 = time.perf_counter()
        sync.outer_step()
        device_synchronize(device_type)
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


def run_sweep():
    """DDP, the grid and the recipes (finished runs are reused), ranked by val bpb; sweep.md and sweep.json."""
    floats = lambda text: [float(v) for v in text.split(",") if v]
    ints = lambda text: [int(v) for v in text.split(",") if v]
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) {unknown}: choose from {', '.join(RECIPES)}")
    specs = [("ddp", ["--sync", "ddp"], W, {})]
    for h in ints(args.sweep_hs):
        for lr in floats(args.sweep_lrs):
            for mom in floats(args.sweep_momenta):
                for w in ints(args.sweep_workers):
                    flags = ["--sync", "diloco", "--diloco-h", str(h), "--outer-lr", str(lr), "--outer-momentum", str(mom)]
                    specs.append((f"sweep_h{h}_lr{lr}_m{mom}_w{w}", flags, w, dict(h=h, lr=lr, momentum=mom, workers=w)))
    for h in ints(args.sweep_sparse_hs):
        for density in floats(args.sweep_sparse_densities):
            for decay in floats(args.sweep_sparse_decays):
                for lr in floats(args.sweep_sparse_lrs):
                    flags = ["--sync", "diloco", "--diloco-h", str(h), "--outer-compression", "sparseloco",
                             "--outer-sparseloco-density", str(density), "--outer-ef-decay", str(decay), "--outer-lr", str(lr)]
                    specs.append((f"sparse_h{h}_d{density}_b{decay}_lr{lr}", flags, W,
                                  dict(h=h, density=density, decay=decay, lr=lr, workers=W)))
    specs += [(f"recipe_{r}", ["--sync", "diloco", "--diloco-h", "50", *RECIPES[r]], W, dict(recipe=" ".join(RECIPES[r])))
              for r in recipes]
    rows, missing = [], []
    for i, (name, flags, w, knobs) in enumerate(specs):
        if args.sweep_finished:
            found = finished_run(name, flags, nproc=w)
            if found is None:
                missing.append(name)
                continue
            meta, wall = found[0], float("nan")
        else:
            print(f"[{i + 1}/{len(specs)}] {name}: {N} steps on {w} processes ...", flush=True)
            meta, _, wall, _ = run_arm(name, flags, nproc=w, reuse=True)
        across = meta["outer_bytes"] if meta["sync"] == "diloco" else meta["inner_bytes"]
        rows.append({"arm": name, **knobs, "val_bpb": meta["val_bpb"], "bytes_across_workers": across,
                     "train_seconds": meta["train_seconds"], "wall_seconds": wall})
        print(f"  val bpb {meta['val_bpb']:.4f} | {across:,} B across workers", flush=True)
    if missing and specs[0][0] in missing:
        raise SystemExit(f"error: no finished DDP run of {N} steps (seed {args.seed}) to compare with: run the sweep "
                         f"without --sweep-finished first")
    ddp = rows[0]
    default = next((r for r in rows if r["arm"] == "sweep_h50_lr0.7_m0.9_w2"), None)
    for r in rows:
        r["gap_vs_ddp"] = r["val_bpb"] - ddp["val_bpb"]
        r["gap_vs_ddp_pct"] = 100 * r["gap_vs_ddp"] / ddp["val_bpb"]
        r["ddp_bytes_over_arm"] = ddp["bytes_across_workers"] / r["bytes_across_workers"]
        r["bytes_over_ddp"] = r["bytes_across_workers"] / ddp["bytes_across_workers"]
    for r in rows:  # the Pareto front of (bytes, gap): no other run sends no more and ends no worse, one strictly
        r["front"] = not any(o["bytes_across_workers"] <= r["bytes_across_workers"] and o["val_bpb"] <= r["val_bpb"] and
                             (o["bytes_across_workers"], o["val_bpb"]) != (r["bytes_across_workers"], r["val_bpb"])
                             for o in rows)
    for r in rows:  # after every gap is known: the default's row may come after others
        r["gap_vs_default"] = r["gap_vs_ddp"] / default["gap_vs_ddp"] if default and default["gap_vs_ddp"] > 0 else None
    lines = [f"DiLoCo sweep: {N} steps x the preset's tokens per step, seed {args.seed}, device {device_type}; DDP on {W} "
             f"processes; ranked by val bpb" + (f"; {len(rows)} of {len(specs)} runs finished, not yet run: "
                                                 f"{', '.join(missing)}" if missing else ""), "",
             "| arm | val bpb | gap vs DDP | gap % | gap / default's | DDP bytes / arm | bytes across workers | front | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"]
    for r in sorted(rows, key=lambda r: r["val_bpb"]):
        rel = "-" if r["gap_vs_default"] is None else f"{r['gap_vs_default']:.2f}"
        lines.append(f"| {r['arm']} | {r['val_bpb']:.4f} | {r['gap_vs_ddp']:+.4f} | {r['gap_vs_ddp_pct']:+.2f}% | {rel} | "
                     f"{r['ddp_bytes_over_arm']:,.1f} | {r['bytes_across_workers']:,} | {'*' if r['front'] else ''} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "gap / default's: the arm's val bpb gap to DDP over that of default DiLoCo (H 50, outer lr 0.7, Nesterov 0.9, "
              "2 workers); below 0.5 halves it. DDP bytes / arm: how many times fewer bytes than DDP crossed between "
              "workers. front: on the Pareto front of bytes and val bpb (no other run sends no more bytes and ends no "
              "worse). sparse_*: codec sparseloco at H, density d (of each chunk of 4096), error-feedback decay b, outer "
              "lr. Recipes: " + "; ".join(f"{r}: {' '.join(RECIPES[r])}" for r in recipes) + "."]
    table = "\n".join(lines)
    print("\n" + table)
    write_atomic(os.path.join(out_dir, "sweep.md"), table + "\n")
    write_atomic(os.path.join(out_dir, "sweep.json"), json.dumps({"num_iterations": N, "seed": args.seed, "rows": rows}, indent=2))
    plot_front(rows, os.path.join(out_dir, "sweep.png"))
    print(f"\nwrote {os.path.join(out_dir, 'sweep.md')}, sweep.json and sweep.png")


def plot_front(rows, path):
    """Bytes across workers over DDP's (log x) against the val bpb gap to DDP (%), each family its colour, the
    Pareto front joined and circled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"ddp": ("DDP", "black"), "sweep": ("DiLoCo grid (fp32)", "tab:blue"),
                "sparse": ("SparseLoCo grid", "tab:green"), "recipe": ("recipes", "tab:red")}
    fig, ax = plt.subplots(figsize=(8, 5))
    for prefix, (label, color) in families.items():
        mine = [r for r in rows if r["arm"].split("_")[0] == prefix]
        if mine:
            ax.scatter([r["bytes_over_ddp"] for r in mine], [r["gap_vs_ddp_pct"] for r in mine], s=18, color=color,
                       label=label)
    front = sorted((r for r in rows if r["front"]), key=lambda r: r["bytes_over_ddp"])
    ax.plot([r["bytes_over_ddp"] for r in front], [r["gap_vs_ddp_pct"] for r in front], "-", color="gray", lw=1,
            zorder=0)
    ax.scatter([r["bytes_over_ddp"] for r in front], [r["gap_vs_ddp_pct"] for r in front], s=90, facecolors="none",
               edgecolors="black", label="Pareto front")
    for r in front:
        ax.annotate(r["arm"], (r["bytes_over_ddp"], r["gap_vs_ddp_pct"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel="bytes across workers / DDP's (log)", ylabel="val bpb gap to DDP (%)",
           title=f"DiLoCo sweep: {N} steps, seed {args.seed}")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(1e-3, color="gray", ls="--", lw=0.8, label="target: 1,000x fewer bytes, gap <= 1%")
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


if args.sweep:
    run_sweep()
    raise SystemExit(0)

# Training arms: DDP first (the baseline), then every H x codec and every H x streaming (F, tau)
arm_specs = [("ddp", None, "none", 1, 0)]
for h in hs:
    arm_specs += [(f"diloco_h{h}" + ("" if c == "none" else f"_{c}"), h, c, 1, 0) for c in compressions]
    arm_specs += [(f"diloco_h{h}_f{f}_tau{tau}", h, "none", f, tau) for f, tau in streaming if (f, tau) != (1, 0)]
results, metas = [], {}
for name, h, compression, fragments, overlap in arm_specs:
    print(f"running {name}: {N} steps on {W} processes ...", flush=True)
    sync = ["--sync", "ddp"] if h is None else diloco_flags(h, compression, fragments, overlap)
    meta, metrics, wall, rc = run_arm(name, sync)
    metas[name] = meta
    params = model_params(meta)
    sizes = [p.numel() for p in params]
    measured = meta["inner_bytes"] if h is None else meta["outer_bytes"]
    expected, peak = expected_bytes(h, compression, params, fragments, overlap)
    results.append({
        "arm": name, "sync": meta["sync"], "h": h, "compression": compression if h else None,
        "fragments": fragments, "overlap": overlap,
        "val_bpb": meta["val_bpb"], "tokens": meta["tokens"], "steps": N, "params": sum(sizes), "tensors": len(sizes),
        "inner_bytes": meta["inner_bytes"], "outer_bytes": meta["outer_bytes"], "bytes_across_workers": measured,
        "expected_bytes": expected, "bytes_check": "PASS" if measured == expected else "FAIL",
        "peak_bytes_per_sync_event": peak, "bytes_per_token": measured / meta["tokens"],
        "train_seconds": meta["train_seconds"], "outer_wait_seconds": meta.get("outer_wait_seconds", 0.0),
        "wall_seconds": wall, "exit_code": rc,
        "loss_curve": [[m["step"], m["loss"]] for m in metrics if "loss" in m],
    })
    print(f"  val bpb {meta['val_bpb']:.4f} | {measured:,} B across workers (expected {expected:,}: "
          f"{results[-1]['bytes_check']}) | {wall:.0f} s", flush=True)
ddp = results[0]
plain = {r["h"]: r for r in results if r["h"] and r["compression"] == "none" and r["fragments"] == 1 and not r["overlap"]}
for r in results:
    r["bpb_gap_pct"] = 100 * (r["val_bpb"] - ddp["val_bpb"]) / ddp["val_bpb"]
    r["ratio_ddp_over_arm"] = ddp["bytes_across_workers"] / r["bytes_across_workers"]
    r["expected_ratio"] = ddp["expected_bytes"] / r["expected_bytes"]
    ref = plain.get(r["h"])
    r["bpb_gap_vs_plain_pct"] = 100 * (r["val_bpb"] - ref["val_bpb"]) / ref["val_bpb"] if ref else None
    r["ratio_plain_over_arm"] = ref["bytes_across_workers"] / r["bytes_across_workers"] if ref else None

# Overlap: does launching the exchange tau steps early hide a slow link? (H=2, every other step syncs)
overlap_check = None
if args.overlap_delay_ms > 0:
    steps = args.overlap_steps
    runs = {"no delay, tau 0": (0, 0), f"delay {args.overlap_delay_ms:g} ms, tau 0": (args.overlap_delay_ms, 0),
            f"delay {args.overlap_delay_ms:g} ms, tau 1": (args.overlap_delay_ms, 1)}
    overlap_check = {"h": 2, "steps": steps, "delay_ms": args.overlap_delay_ms, "runs": {}}
    for i, (label, (delay, tau)) in enumerate(runs.items()):
        print(f"overlap check: {label}, {steps} steps ...", flush=True)
        meta, _, _, _ = run_arm(f"overlap{i}", diloco_flags(2, "none", 1, tau) + ["--comm-delay-ms", str(delay)], steps)
        overlap_check["runs"][label] = {"ms_per_step": 1000 * meta["train_seconds"] / steps,
                                        "outer_wait_seconds": meta.get("outer_wait_seconds", 0.0)}
    ms = [r["ms_per_step"] for r in overlap_check["runs"].values()]
    overlap_check["blocking_over_no_delay"] = ms[1] / ms[0]
    overlap_check["overlapped_over_no_delay"] = ms[2] / ms[0]

overhead = None
if args.overhead_rounds > 0:
    oh = args.overhead_h or min(hs)
    print(f"measuring the wrapper overhead: {args.overhead_rounds} rounds of {oh} steps per arm ...", flush=True)
    overhead = measure_overhead(metas["ddp"], oh, args.overhead_rounds)  # the model the arms trained

# Report: table on stdout, markdown + JSON next to the logs
P, n = ddp["params"], ddp["tensors"]
lines = [f"DiLoCo vs DDP: {N} steps x {ddp['tokens'] // N:,} tokens = {ddp['tokens']:,} tokens per arm, {W} processes "
         f"({W} DiLoCo workers), {P:,} parameters in {n} tensors, device {device_type}, seed {args.seed}", "",
         "| arm | val bpb | gap vs DDP | gap vs plain | bytes across workers | bytes/token | DDP/arm | plain/arm "
         "| peak B/sync event | bytes check | train s | outer wait s | wall s |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
pct = lambda v: "-" if v is None else f"{v:+.2f}%"
ratio = lambda v: "-" if v is None else f"{v:,.1f}"
for r in results:
    lines.append(f"| {r['arm']} | {r['val_bpb']:.4f} | {r['bpb_gap_pct']:+.2f}% | {pct(r['bpb_gap_vs_plain_pct'])} | "
                 f"{r['bytes_across_workers']:,} | {r['bytes_per_token']:,.2f} | {ratio(r['ratio_ddp_over_arm'])} | "
                 f"{ratio(r['ratio_plain_over_arm'])} | {r['peak_bytes_per_sync_event']:,} | {r['bytes_check']} | "
                 f"{r['train_seconds']:.1f} | {r['outer_wait_seconds']:.1f} | {r['wall_seconds']:.1f} |")
lines += ["", f"Bytes are sent on the wire under the ring model, summed over ranks: DDP = steps x {W} x 2({W}-1)/{W} x 4P; "
          f"DiLoCo = sum over fragments of exchanges x {W} x codec.wire_bytes({W}) (diloco/codecs.py). 'bytes check' "
          "compares the measured bytes with that exact figure. 'gap vs plain' and 'plain/arm' compare with plain DiLoCo "
          "(codec none, one fragment, no overlap) at the same H. 'peak B/sync event': the most one rank sends in one "
          "fragment's exchange. 'outer wait s': time the inner steps were blocked on outer exchanges."]
if overlap_check:
    oc = overlap_check
    lines += ["", f"Overlap check (DiLoCo H={oc['h']}, {oc['steps']} steps, every outer collective slowed by "
              f"{oc['delay_ms']:g} ms with --comm-delay-ms):", "",
              "| run | ms per inner step | outer wait s |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {r['ms_per_step']:.0f} | {r['outer_wait_seconds']:.2f} |" for label, r in oc["runs"].items()]
    lines += ["", f"Blocking (tau 0) / no delay: {oc['blocking_over_no_delay']:.3f}; overlapped (tau 1) / no delay: "
              f"{oc['overlapped_over_no_delay']:.3f} (target <= 1.10)."]
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


write_atomic(os.path.join(out_dir, "diloco.md"), table + "\n")
write_atomic(os.path.join(out_dir, "diloco.json"), json.dumps(
    {"num_iterations": N, "nproc": W, "hs": hs, "compressions": compressions, "streaming": streaming, "seed": args.seed,
     "train_args": train_args, "arms": results, "overhead": overhead, "overlap": overlap_check}, indent=2))
print(f"\nwrote {os.path.join(out_dir, 'diloco.json')} and diloco.md")
if any(r["bytes_check"] == "FAIL" for r in results):
    raise SystemExit("error: measured bytes differ from the expected figures (see 'bytes check')")
