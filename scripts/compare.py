"""The DDP-vs-DiLoCo experiment: every stage of the pipeline for each arm, then one comparison report.

Arms (from "What happens when nanochat meets DiLoCo?"), same data, tokenizer, model, token budget and seed:
  ddp         DDP pretrain    -> DDP mid    -> DDP SFT      (the baseline)
  diloco      DiLoCo pretrain -> DiLoCo mid -> DiLoCo SFT
  diloco_ddp  DiLoCo pretrain -> DDP mid    -> DDP SFT
Arms that share a pretraining mode share its base checkpoint (and the tokenizer and data are shared by all).

Every stage records a marker (<base>/runs/<stage>.json) with its outputs' SHA-256 and its inputs' markers.
A re-run skips a stage only when its marker matches (same command), its outputs verify and its inputs are
unchanged; a partial, corrupted or stale output is redone (with everything downstream of it).

    python -m scripts.compare                       # all three arms, scale chosen by the hardware
    python -m scripts.compare --arms ddp --scale tiny
    python -m scripts.compare --diloco-flags "--diloco-fragments 4 --diloco-overlap 1 --outer-compression int4"
"""

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step
from nanochat.common import get_base_dir
from nanochat.report import environment

ARMS = {"ddp": ("ddp", "ddp"), "diloco": ("diloco", "diloco"), "diloco_ddp": ("diloco", "ddp"),
        "ddp_diloco": ("ddp", "diloco")}
ARM_LABELS = {"ddp": "(a) DDP -> DDP mid/SFT", "diloco": "(b) DiLoCo -> DiLoCo mid/SFT",
              "diloco_ddp": "(c) DiLoCo -> DDP mid/SFT", "ddp_diloco": "(d) DDP -> DiLoCo mid/SFT"}

# Per scale: flags of each stage, and the DiLoCo flags of each stage (added when that stage runs DiLoCo).
SCALES = {
    # a few steps of everything: for tests
    "micro": dict(
        nproc=2, vocab=512,
        base=["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
              "--total-batch-size", "512", "--num-iterations", "6", "--eval-every", "2", "--eval-tokens", "1024",
              "--sample-every", "0"],
        mid=["--num-iterations", "4", "--device-batch-size", "4", "--eval-every", "2", "--eval-batches", "2"],
        sft=["--num-iterations", "2", "--device-batch-size", "2", "--examples-per-step", "4", "--max-seq-len", "128",
             "--eval-every", "0", "--eval-batches", "1"],
        base_eval=["--max-per-task", "4", "--split-tokens", "2048", "--device-batch-size", "4"],
        chat_eval=["--max-problems", "4", "--max-new-tokens", "16", "--batch-size", "4"],
        diloco={"base": ["--diloco-h", "2"], "mid": ["--diloco-h", "2"], "sft": ["--diloco-h", "1"]}),
    # CPU, 2 processes, about 20 minutes for all three arms on 2 cores
    "tiny": dict(
        nproc=2, vocab=4096,
        base=["--preset", "tiny", "--num-iterations", "400", "--eval-every", "50"],
        mid=["--num-iterations", "100", "--device-batch-size", "16", "--eval-every", "50", "--eval-batches", "8"],
        sft=["--num-iterations", "60", "--device-batch-size", "4", "--examples-per-step", "16", "--eval-every", "20",
             "--eval-batches", "8"],
        base_eval=["--max-per-task", "100", "--split-tokens", "131072", "--device-batch-size", "16"],
        chat_eval=["--max-problems", "100", "--max-new-tokens", "128", "--batch-size", "16"],
        diloco={"base": ["--diloco-h", "50"], "mid": ["--diloco-h", "50"], "sft": ["--diloco-h", "20"]}),
    # nanochat's d20 speedrun on one node of GPUs
    "d20": dict(
        nproc=None, vocab=65536,
        base=["--preset", "d20"], mid=[], sft=[], base_eval=["--max-per-task", "500"], chat_eval=[],
        diloco={"base": ["--diloco-h", "100"], "mid": ["--diloco-h", "100"], "sft": ["--diloco-h", "20"]}),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Runner:
    """Runs stages once; remembers (marker files) what was done with which inputs."""

    def __init__(self, run_dir, force=False):
        self.run_dir, self.force = run_dir, force
        os.makedirs(run_dir, exist_ok=True)
        self.redone = set()

    def marker_path(self, name):
        return os.path.join(self.run_dir, f"{name}.json")

    def marker(self, name):
        try:
            with open(self.marker_path(name)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def done(self, name, inputs, cmd=None):
        m = self.marker(name)
        if self.force or m is None or m["inputs"] != {i: self.digest(i) for i in inputs}:
            return False
        if cmd is not None and m["cmd"] != cmd:
            print(f"[{name}] its flags changed: redoing the stage", flush=True)
            return False
        for path, digest in m["outputs"].items():
            if not os.path.exists(path) or sha256(path) != digest:
                print(f"[{name}] output {path} is missing or corrupted: redoing the stage", flush=True)
                return False
        return True

    def digest(self, name):
        m = self.marker(name)
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest() if m else None

    def run(self, name, cmd, inputs, find_outputs, env=None):
        """Run cmd unless stage `name` is done; find_outputs() lists its output files after a run."""
        if self.done(name, inputs, cmd):
            print(f"[{name}] done earlier, skipping", flush=True)
            return self.marker(name)
        if os.path.exists(self.marker_path(name)):
            os.remove(self.marker_path(name))  # a stage that fails half-way leaves no marker behind
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        t0 = time.time()
        log_path = os.path.join(self.run_dir, f"{name}.log")
        with open(log_path, "w") as log:  # the stage's output goes to the terminal and to its log file
            proc = subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"[{name}] failed with exit code {proc.returncode} (log: {log_path}): {' '.join(cmd)}")
        seconds = time.time() - t0
        outputs = find_outputs()
        marker = {"name": name, "cmd": cmd, "seconds": seconds, "inputs": {i: self.digest(i) for i in inputs},
                  "outputs": {p: sha256(p) for p in outputs}}
        tmp = self.marker_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
        os.replace(tmp, self.marker_path(name))
        self.redone.add(name)
        print(f"[{name}] finished in {seconds:.1f} s", flush=True)
        return marker


def last_checkpoint_files(stage, tag):
    d = checkpoint_dir(stage, tag)
    step = find_last_step(d)
    if step is None:
        raise SystemExit(f"stage {stage}/{tag} wrote no checkpoint in {d}")
    step_dir = os.path.join(d, f"step_{step:06d}")
    return [os.path.join(step_dir, "model.pt"), os.path.join(step_dir, "meta.json"), os.path.join(d, "metrics.jsonl")]


def eval_file(prefix, tag):
    files = sorted(glob.glob(os.path.join(get_base_dir(), "eval", f"{prefix}_{tag}_step*.json")), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no eval results {prefix}_{tag}_step*.json in {os.path.join(get_base_dir(), 'eval')}")
    return files[-1]


def python_cmd(module, args):
    return [sys.executable, "-m", module, *args]


def torchrun_cmd(nproc, module, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]


def run_experiment(arms, scale_name, force=False, seed=1337, diloco_flags=()):
    scale = SCALES[scale_name]
    nproc = scale["nproc"] or max(1, torch.cuda.device_count())
    base_dir = get_base_dir()
    runner = Runner(os.path.join(base_dir, "runs"), force=force)
    env = {"OMP_NUM_THREADS": "1"} if not torch.cuda.is_available() else {}
    seed_args = ["--seed", str(seed)]

    # data and tokenizer: shared by every arm; existing valid outputs are adopted
    from nanochat.dataset import ensure_data, list_parquet_files
    from nanochat.tokenizer import get_tokenizer
    if not list_parquet_files():
        ensure_data(num_shards=240 if scale_name == "d20" else 0)
    try:
        get_tokenizer()
    except (FileNotFoundError, RuntimeError):
        subprocess.run(python_cmd("scripts.tok_train", ["--vocab-size", str(scale["vocab"])]), check=True)
        subprocess.run(python_cmd("scripts.tok_eval", []), check=True)

    results = {}
    for arm in arms:
        pre_sync, post_sync = ARMS[arm]
        sync = lambda stage, mode: ["--sync", mode] + ([*scale["diloco"][stage], *diloco_flags] if mode == "diloco" else [])
        base_tag = f"base_{pre_sync}"
        base = f"base_train-{pre_sync}"
        # report sections: shared base stages in report/base_<sync>, the arm's own in report/<arm>
        base_report, arm_report = (os.path.join(base_dir, "report", name) for name in (base_tag, arm))
        env_base, env_arm = dict(env, NANOCHAT_REPORT_DIR=base_report), dict(env, NANOCHAT_REPORT_DIR=arm_report)
        runner.run(base, torchrun_cmd(nproc, "scripts.base_train", scale["base"] + sync("base", pre_sync) + seed_args +
                                      ["--model-tag", base_tag]),
                   [], lambda: last_checkpoint_files("base", base_tag), env_base)
        base_ev = f"base_eval-{pre_sync}"
        runner.run(base_ev, python_cmd("scripts.base_eval", scale["base_eval"] + ["--model-tag", base_tag]),
                   [base], lambda: [eval_file("base", base_tag)], env_base)
        mid = f"mid_train-{arm}"
        runner.run(mid, torchrun_cmd(nproc, "scripts.mid_train", scale["mid"] + sync("mid", post_sync) + seed_args +
                                     ["--model-tag", base_tag, "--output-tag", arm]),
                   [base], lambda: last_checkpoint_files("mid", arm), env_arm)
        sft = f"chat_sft-{arm}"
        runner.run(sft, torchrun_cmd(nproc, "scripts.chat_sft", scale["sft"] + sync("sft", post_sync) + seed_args +
                                     ["--model-tag", arm]),
                   [mid], lambda: last_checkpoint_files("sft", arm), env_arm)
        chat_ev = f"chat_eval-{arm}"
        runner.run(chat_ev, torchrun_cmd(nproc, "scripts.chat_eval", ["-i", "sft", "--model-tag", arm] + scale["chat_eval"]),
                   [sft], lambda: [eval_file("chat_sft", arm)], env_arm)
        arm_report_md = arm_card(base_report, arm_report)
        results[arm] = collect_arm(runner, arm, [base, base_ev, mid, sft, chat_ev], base_tag)
        results[arm].update(report_card=arm_report_md, stages=[base, base_ev, mid, sft, chat_ev])
    return results, runner


def arm_card(base_report, arm_report):
    """The arm's own report card (nanochat's report.md): the shared tokenizer and base sections plus the arm's."""
    from nanochat.report import Report
    os.makedirs(arm_report, exist_ok=True)
    tokenizer_sections = glob.glob(os.path.join(os.path.dirname(base_report), "tokenizer-*.md"))
    for section in tokenizer_sections + glob.glob(os.path.join(base_report, "*.md")):
        if os.path.basename(section) != "report.md":
            shutil.copy(section, arm_report)
    return Report(arm_report).generate()


def collect_arm(runner, arm, stages, base_tag):
    """The arm's figures, read back from its checkpoints' metadata and eval results."""
    def meta(stage, tag):
        d = checkpoint_dir(stage, tag)
        with open(os.path.join(d, f"step_{find_last_step(d):06d}", "meta.json")) as f:
            return json.load(f)
    base_meta, mid_meta, sft_meta = meta("base", base_tag), meta("mid", arm), meta("sft", arm)
    with open(eval_file("base", base_tag)) as f:
        base_eval = json.load(f)
    with open(eval_file("chat_sft", arm)) as f:
        chat_eval = json.load(f)
    row = {"val_bpb": base_meta["val_bpb"], "CORE": base_eval["core"]}
    for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"):
        row[task] = chat_eval["tasks"][task]["accuracy"]
    row["ChatCORE"] = chat_eval["ChatCORE"]
    across = lambda m: m["outer_bytes"] if m["sync"] == "diloco" else m["inner_bytes"]
    row["bytes_across_workers"] = across(base_meta) + across(mid_meta) + across(sft_meta)
    row["wall_seconds"] = sum(runner.marker(s)["seconds"] for s in stages)
    curve = [json.loads(line) for line in open(os.path.join(checkpoint_dir("base", base_tag), "metrics.jsonl"))]
    curve = [r for r in curve if "val_bpb" in r]
    return {"row": row, "curve": curve, "sync": ARMS[arm], "base_meta": base_meta,
            "configs": {"base": base_meta["user_config"], "mid": mid_meta["user_config"], "sft": sft_meta["user_config"]},
            "core_tasks": {"used": base_eval["core_tasks_used"], "missing": base_eval["core_tasks_missing"],
                           "source": base_eval["core_source"]}}


COLUMNS = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE",
           "bytes_across_workers", "wall_seconds"]


def fmt(key, value):
    if key == "bytes_across_workers":
        return f"{value:,.0f}"
    if key == "wall_seconds":
        return f"{value:.0f}"
    return f"{value:.4f}"


def effective_config(config):
    """A stage's flags as they acted: DiLoCo flags mean nothing under DDP, checkpoint tags are names only."""
    ddp = config.get("sync") == "ddp"
    return {k: ("-" if ddp and k.startswith(("diloco", "outer")) else v) for k, v in config.items()
            if k not in ("model_tag", "output_tag")}


def differing_hyperparameters(results):
    """Every (stage, flag) whose value differs between arms."""
    rows = []
    for stage in ("base", "mid", "sft"):
        configs = {arm: effective_config(r["configs"][stage]) for arm, r in results.items()}
        keys = sorted(set().union(*(c.keys() for c in configs.values())))
        for key in keys:
            values = {arm: c.get(key) for arm, c in configs.items()}
            if len({json.dumps(v) for v in values.values()}) > 1:
                rows.append((stage, key, values))
    return rows


def write_report(results, runner, out_dir, scale_name, total_seconds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    all_stages = sorted({stage for r in results.values() for stage in r["stages"]})
    stage_seconds = sum(runner.marker(stage)["seconds"] for stage in all_stages)
    redone = runner.redone

    styles = ["-", "--", ":", "-."]  # arms that share a base model draw the same curve: keep both visible
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, r) in enumerate(results.items()):
        ax.plot([p["tokens"] for p in r["curve"]], [p["val_bpb"] for p in r["curve"]], marker="o", linestyle=styles[i % 4],
                label=ARM_LABELS[arm])
    ax.set_xlabel("pretraining tokens")
    ax.set_ylabel("val bits per byte")
    ax.set_title("Pretraining: val bpb vs tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    bpb_tokens = os.path.join(out_dir, "val_bpb_vs_tokens.png")
    fig.tight_layout()
    fig.savefig(bpb_tokens, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, r) in enumerate(results.items()):
        label = "outer_bytes" if r["sync"][0] == "diloco" else "inner_bytes"
        points = [(p[label], p["val_bpb"]) for p in r["curve"] if p[label] > 0]
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", linestyle=styles[i % 4], label=ARM_LABELS[arm])
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated across workers (all ranks, cumulative)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("Pretraining: val bpb vs communication")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    bpb_bytes = os.path.join(out_dir, "val_bpb_vs_bytes.png")
    fig.tight_layout()
    fig.savefig(bpb_bytes, dpi=120)
    plt.close(fig)

    lines = ["# DDP vs DiLoCo: end-to-end comparison", ""]
    lines.append(f"Scale `{scale_name}`; the stages of all arms took {stage_seconds:.0f} s of wall time when they ran "
                 f"(this invocation: {total_seconds:.0f} s; it re-ran {len(redone)} of {len(all_stages)} stages).")
    lines.append("")
    lines.append("| arm | " + " | ".join(COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(COLUMNS))
    for arm, r in results.items():
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(fmt(k, r["row"][k]) for k in COLUMNS) + " |")
    lines += ["", "Columns: val_bpb after pretraining (val shard); CORE of the base model; ARC/MMLU/GSM8K/HumanEval/ChatCORE "
              "of the SFT model; bytes_across_workers = bytes handed to cross-worker collectives by all ranks over "
              "pretraining + mid + SFT (DDP: the per-step gradient all-reduce; DiLoCo: the outer sync); wall_seconds = "
              "the arm's stages, including the shared ones.", ""]
    lines += [f"![val bpb vs tokens]({os.path.basename(bpb_tokens)})", "",
              f"![val bpb vs bytes]({os.path.basename(bpb_bytes)})", ""]
    first = next(iter(results.values()))
    core = first["core_tasks"]
    lines += ["## CORE tasks", "", f"- source: {core['source']}", f"- used: {', '.join(core['used'] or [])}",
              f"- missing: {', '.join(core['missing'] or []) or 'none'}", ""]
    lines += ["## Hyper-parameters that differ between arms", ""]
    lines += ["| stage | flag | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for stage, key, values in differing_hyperparameters(results):
        lines.append(f"| {stage} | {key} | " + " | ".join(str(values[a]) for a in results) + " |")
    lines += ["", "## Shared hyper-parameters (pretraining)", ""]
    base_cfg = first["configs"]["base"]
    lines.append(", ".join(f"{k}={v}" for k, v in sorted(base_cfg.items()) if k not in ("sync",) and not k.startswith(("diloco", "outer"))))
    m = first["base_meta"]
    lines += ["", f"Model: {m['model_config']}", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in environment().items()]
    report = os.path.join(out_dir, "report.md")
    with open(report + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(report + ".tmp", report)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({arm: r["row"] for arm, r in results.items()}, f, indent=1)
    return report, bpb_tokens, bpb_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the DDP-vs-DiLoCo arms end to end and write a comparison report")
    parser.add_argument("--arms", default="ddp,diloco,diloco_ddp", help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--scale", choices=["auto", *SCALES], default="auto", help="auto: d20 on CUDA, tiny on CPU")
    parser.add_argument("--force", action="store_true", help="redo every stage even if done")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default=None, help="report folder (default: <base>/compare)")
    parser.add_argument("--diloco-flags", default="",
                        help="extra flags for every DiLoCo stage, e.g. \"--diloco-fragments 4 --diloco-overlap 1 "
                             "--outer-compression int4\" (stages whose flags changed are redone)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    scale = args.scale if args.scale != "auto" else ("d20" if torch.cuda.is_available() else "tiny")
    t0 = time.time()
    results, runner = run_experiment(arms, scale, force=args.force, seed=args.seed, diloco_flags=shlex.split(args.diloco_flags))
    out = args.out or os.path.join(get_base_dir(), "compare")
    report, png1, png2 = write_report(results, runner, out, scale, time.time() - t0)
    print(open(report).read())
    print(f"report: {report}\nplots: {png1}, {png2}\nstages run this time: {sorted(runner.redone) or 'none'}")


if __name__ == "__main__":
    main()
