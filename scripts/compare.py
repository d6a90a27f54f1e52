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

from diloco.recipes import RECIPES, recipe_flags
from nanochat.checkpoint import checkpoint_dir, find_last_step
from nanochat.common import get_base_dir, sha256_file, write_atomic
from nanochat.report import environment
from nanochat.stage import lineage
from tasks.chat_eval import TASK_NAMES

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
        sft=["--num-iterations", "2", "--device-batch-size", "4", "--examples-per-step", "8", "--max-seq-len", "128",
             "--eval-every", "0", "--eval-batches", "1"],
        base_eval=["--max-per-task", "4", "--split-tokens", "2048", "--device-batch-size", "4"],
        chat_eval=["--max-problems", "4", "--max-new-tokens", "16", "--batch-size", "4"],
        chat_bpb_batches=1,
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
        chat_bpb_batches=8,
        diloco={"base": ["--diloco-h", "50"], "mid": ["--diloco-h", "50"], "sft": ["--diloco-h", "20"]}),
    # nanochat's d20 speedrun on one node of GPUs
    "d20": dict(
        nproc=None, vocab=65536,
        base=["--preset", "d20"], mid=[], sft=[], base_eval=["--max-per-task", "500"], chat_eval=[],
        chat_bpb_batches=20,
        diloco={"base": ["--diloco-h", "100"], "mid": ["--diloco-h", "100"], "sft": ["--diloco-h", "20"]}),
}

# one step up from tiny: depth 4, width 256 (about 5 M parameters), the same tokens, tokenizer and stage budgets;
# its checkpoints carry "_small", beside tiny's in the same base dir
SCALES["small"] = dict(SCALES["tiny"], tag="_small", base=["--preset", "tiny", "--depth", "4", "--aspect-ratio", "64",
                                                         "--num-iterations", "400", "--eval-every", "100"])


class Runner:
    """Runs stages once; remembers (marker files) what was done with which inputs."""

    def __init__(self, run_dir, force=False, dry_run=False):
        self.run_dir, self.force, self.dry_run = run_dir, force, dry_run
        os.makedirs(run_dir, exist_ok=True)
        self.redone = set()  # with dry_run: the stages that would run

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
        if m is None or m["inputs"] != {i: self.digest(i) for i in inputs}:
            return False  # never run, or an input stage re-ran since (a new marker has a new digest)
        if self.force and name not in self.redone:
            return False  # --force: every stage once, not again for each arm that shares it
        if self.dry_run and self.redone & set(inputs):
            return False  # a dry run writes no markers: an input that would run marks this stage too
        if cmd is not None and m["cmd"] != cmd:
            print(f"[{name}] its flags changed: the stage runs again", flush=True)
            return False
        for path, digest in m["outputs"].items():
            if not os.path.exists(path) or sha256_file(path) != digest:
                print(f"[{name}] output {path} is missing or corrupted: the stage runs again", flush=True)
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
        if self.dry_run:
            if name not in self.redone:  # a base stage shared by arms (b) and (c) is listed once
                print(f"[{name}] would run: {' '.join(cmd)}", flush=True)
            self.redone.add(name)
            return None
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
                  "outputs": {p: sha256_file(p) for p in outputs}}
        write_atomic(self.marker_path(name), json.dumps(marker, indent=1))
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


def prepare_data_and_tokenizer(scale_name, dry_run=False):
    """The data and the tokenizer, shared by every arm; existing valid ones are adopted."""
    from nanochat.dataset import ensure_data, list_parquet_files
    from nanochat.tokenizer import get_tokenizer
    scale = SCALES[scale_name]
    try:
        tokenizer = get_tokenizer()
    except (FileNotFoundError, RuntimeError):
        tokenizer = None
    if dry_run:
        if not list_parquet_files() or tokenizer is None:
            print(f"the data or the tokenizer is missing in {get_base_dir()}: a run would prepare them first", flush=True)
        return
    if not list_parquet_files():
        ensure_data(num_shards=240 if scale_name == "d20" else 0)
    if tokenizer is None:
        subprocess.run(python_cmd("scripts.tok_train", ["--vocab-size", str(scale["vocab"])]), check=True)
        subprocess.run(python_cmd("scripts.tok_eval", []), check=True)
        tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != scale["vocab"]:
        print(f"NOTE: the tokenizer in {get_base_dir()} has {tokenizer.get_vocab_size():,} tokens, scale {scale_name} asks "
              f"for {scale['vocab']:,}: using it (set NANOCHAT_BASE_DIR to another folder for a tokenizer of the scale's own)")


def run_experiment(arms, scale_name, force=False, seed=1337, diloco_flags=(), seeds=1, recipe="paper", dry_run=False,
                   runner=None, nproc=None):
    """Every stage of every arm, for seeds seed, seed+1, ... (seed i > 0 also draws its own data order and its
    checkpoints carry the suffix -s<i>). recipe (diloco/recipes.py): flags of every DiLoCo stage; the checkpoints
    of arms with a DiLoCo stage carry its name unless it is "paper", so arm (a) is shared between recipes.
    dry_run: print the stages that would run (runner.redone) and run nothing. runner: another recipe's, so that
    the stages both share (arm (a)) run once per invocation, also with force. nproc: ranks per stage (default the scale's).
    Returns ({arm: [one result per seed]}, runner); the results are empty with dry_run."""
    diloco_flags = [*recipe_flags(recipe), *diloco_flags]
    scale = SCALES[scale_name]
    nproc = nproc or scale["nproc"] or max(1, torch.cuda.device_count())
    base_dir = get_base_dir()
    runner = runner or Runner(os.path.join(base_dir, "runs"), force=force, dry_run=dry_run)
    env = {"OMP_NUM_THREADS": "1"} if not torch.cuda.is_available() else {}

    prepare_data_and_tokenizer(scale_name, dry_run)
    chat_bpb = ["--chat-bpb-batches", str(scale["chat_bpb_batches"])]
    categorical = ["-a", "ARC-Easy|ARC-Challenge|MMLU"]
    results = {arm: [] for arm in arms}
    for i in range(seeds):
        sfx = f"-s{i}" if i else ""
        seed_args = ["--seed", str(seed + i)] + (["--data-seed", str(i)] if i else [])
        for arm in arms:
            pre_sync, post_sync = ARMS[arm]
            sync = lambda stage, mode: ["--sync", mode] + ([*scale["diloco"][stage], *diloco_flags] if mode == "diloco" else [])
            rsfx = scale.get("tag", "") + ("" if recipe == "paper" else f"_{recipe}")
            base_tag = f"base_{pre_sync}{rsfx if pre_sync == 'diloco' else scale.get('tag', '')}{sfx}"
            arm_tag = f"{arm}{rsfx if 'diloco' in ARMS[arm] else scale.get('tag', '')}{sfx}"
            base = f"base_train-{base_tag.removeprefix('base_')}"
            # report sections: shared base stages in report/base_<sync>, the arm's own in report/<arm>
            base_report, arm_report = (os.path.join(base_dir, "report", name) for name in (base_tag, arm_tag))
            env_base, env_arm = dict(env, NANOCHAT_REPORT_DIR=base_report), dict(env, NANOCHAT_REPORT_DIR=arm_report)
            runner.run(base, torchrun_cmd(nproc, "scripts.base_train", scale["base"] + sync("base", pre_sync) + seed_args +
                                          ["--model-tag", base_tag]),
                       [], lambda: last_checkpoint_files("base", base_tag), env_base)
            base_ev = f"base_eval-{base_tag.removeprefix('base_')}"
            runner.run(base_ev, python_cmd("scripts.base_eval", scale["base_eval"] + ["--model-tag", base_tag]),
                       [base], lambda: [eval_file("base", base_tag)], env_base)
            base_chat = f"chat_eval_base-{base_tag.removeprefix('base_')}"  # the base model on the chat measures, before mid
            runner.run(base_chat, torchrun_cmd(nproc, "scripts.chat_eval", ["-i", "base", "--model-tag", base_tag] +
                                               categorical + scale["chat_eval"] + chat_bpb),
                       [base], lambda: [eval_file("chat_base", base_tag)], env_base)
            mid = f"mid_train-{arm_tag}"
            runner.run(mid, torchrun_cmd(nproc, "scripts.mid_train", scale["mid"] + sync("mid", post_sync) + seed_args +
                                         ["--model-tag", base_tag, "--output-tag", arm_tag]),
                       [base], lambda: last_checkpoint_files("mid", arm_tag), env_arm)
            mid_chat = f"chat_eval_mid-{arm_tag}"
            runner.run(mid_chat, torchrun_cmd(nproc, "scripts.chat_eval", ["-i", "mid", "--model-tag", arm_tag] +
                                              categorical + scale["chat_eval"] + chat_bpb),
                       [mid], lambda: [eval_file("chat_mid", arm_tag)], env_arm)
            sft = f"chat_sft-{arm_tag}"
            runner.run(sft, torchrun_cmd(nproc, "scripts.chat_sft", scale["sft"] + sync("sft", post_sync) + seed_args +
                                         ["--model-tag", arm_tag]),
                       [mid], lambda: last_checkpoint_files("sft", arm_tag), env_arm)
            chat_ev = f"chat_eval-{arm_tag}"
            runner.run(chat_ev, torchrun_cmd(nproc, "scripts.chat_eval", ["-i", "sft", "--model-tag", arm_tag] +
                                             scale["chat_eval"] + chat_bpb),
                       [sft], lambda: [eval_file("chat_sft", arm_tag)], env_arm)
            if dry_run:
                continue
            stages = [base, base_ev, base_chat, mid, mid_chat, sft, chat_ev]
            r = collect_arm(runner, arm_tag, stages, base_tag)
            r.update(report_card=arm_card(base_report, arm_report), stages=stages, sync=ARMS[arm], seed=seed + i,
                     tags={"base": base_tag, "mid": arm_tag, "sft": arm_tag})
            results[arm].append(r)
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


def bytes_across(record, sync):
    """Bytes across workers of a checkpoint's meta or an eval record: the sync object's own figure. Stages trained
    before 2026-12-07 did not record it; for them it is what the sync mode sends between workers."""
    if "bytes_across_workers" in record:
        return record["bytes_across_workers"]
    return record["outer_bytes"] if sync == "diloco" else record["inner_bytes"]


def collect_arm(runner, arm_tag, stages, base_tag):
    """The arm's figures (one seed), read back from its checkpoints' metadata and eval results."""
    def meta(stage, tag):
        d = checkpoint_dir(stage, tag)
        with open(os.path.join(d, f"step_{find_last_step(d):06d}", "meta.json")) as f:
            return json.load(f)

    def load(path):
        with open(path) as f:
            return json.load(f)
    base_meta, mid_meta, sft_meta = meta("base", base_tag), meta("mid", arm_tag), meta("sft", arm_tag)
    base_eval = load(eval_file("base", base_tag))
    chat = {"base": load(eval_file("chat_base", base_tag)), "mid": load(eval_file("chat_mid", arm_tag)),
            "sft": load(eval_file("chat_sft", arm_tag))}
    row = {"val_bpb": base_meta["val_bpb"], "chat_bpb_base": chat["base"]["chat_val_bpb"],
           "mid_val_bpb": mid_meta["val_bpb"], "sft_val_bpb": chat["sft"]["chat_val_bpb"], "CORE": base_eval["core"]}
    for task in TASK_NAMES:
        row[task] = chat["sft"]["tasks"][task]["accuracy"]
    row["ChatCORE"] = chat["sft"]["ChatCORE"]
    row["bytes_across_workers"] = sum(bytes_across(m, m["sync"]) for m in (base_meta, mid_meta, sft_meta))
    row["wall_seconds"] = sum(runner.marker(s)["seconds"] for s in stages)
    by_stage = {stage: {"chat_val_bpb": c["chat_val_bpb"],
                        **{f"{task} log p": c["tasks"][task]["mean_logprob"] for task in LOGP_TASKS},
                        **{f"{task} acc": c["tasks"][task]["accuracy"] for task in LOGP_TASKS}}
                for stage, c in chat.items()}
    curve = [json.loads(line) for line in open(os.path.join(checkpoint_dir("base", base_tag), "metrics.jsonl"))]
    curve = [r for r in curve if "val_bpb" in r]
    return {"row": row, "by_stage": by_stage, "curve": curve, "base_meta": base_meta,
            "configs": {"base": base_meta["user_config"], "mid": mid_meta["user_config"], "sft": sft_meta["user_config"]},
            "core_tasks": {"used": base_eval["core_tasks_used"], "missing": base_eval["core_tasks_missing"],
                           "source": base_eval["core_source"]}}


LOGP_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU"]
COLUMNS = ["val_bpb", "chat_bpb_base", "mid_val_bpb", "sft_val_bpb", "CORE", *TASK_NAMES, "ChatCORE",
           "bytes_across_workers", "wall_seconds"]
STAGES = lineage("sft")  # the stages of every arm (nanochat/stage.py)


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
    for stage in STAGES:
        configs = {arm: effective_config(r["configs"][stage]) for arm, r in results.items()}
        keys = sorted(set().union(*(c.keys() for c in configs.values())))
        for key in keys:
            values = {arm: c.get(key) for arm, c in configs.items()}
            if len({json.dumps(v) for v in values.values()}) > 1:
                rows.append((stage, key, values))
    return rows


def measure_drift(results):
    """Distances between arm (a) and every other arm after each stage, seed by seed: relative L2 of the weights
    and linear CKA of every layer's hidden states on a fixed batch of val text (nanochat/drift.py). With several
    seeds, also between two seeds of arm (a): the distance chance alone puts between two DDP runs."""
    from nanochat.checkpoint import load_model
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.drift import layer_cka, relative_l2
    if "ddp" not in results:
        return []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = [(ARM_LABELS[arm].split(" ")[0] + " vs (a)", arm, j, j) for j in range(len(results["ddp"]))
             for arm in results if arm != "ddp"]
    if len(results["ddp"]) > 1:
        pairs.append(("(a) seed 1 vs seed 0", "ddp", 1, 0))
    records, idx = [], None
    for stage in STAGES:
        for label, arm, j, j_ref in pairs:
            ref_model, tokenizer, _ = load_model(stage, device, phase="eval", model_tag=results["ddp"][j_ref]["tags"][stage])
            other, _, _ = load_model(stage, device, phase="eval", model_tag=results[arm][j]["tags"][stage])
            if idx is None:  # the first rows of the val split, one batch for every pair and stage
                T = ref_model.config.sequence_len
                idx = next(tokenizing_distributed_data_loader(4, T, "val", tokenizer, device, rank=0, world_size=1))[0]
            records.append({"pair": label, "arm": arm, "seed": j, "stage": stage,
                            "relative_l2": relative_l2(ref_model.state_dict(), other.state_dict()),
                            "cka": layer_cka(ref_model, other, idx)})
            del ref_model, other
    return records


def mean(values):
    return sum(values) / len(values)


def std(values):
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def gap_against_baseline(values, baseline, reference, fraction=0.5):
    """Seed by seed, an arm's gap to the reference arm (a) against the same arm's gap under a baseline recipe.
    Returns (mean gap, mean baseline gap, ratio of the means, and whether the gap is below `fraction` of the
    baseline's beyond two standard errors: the paired differences (v - r) - fraction x (b - r) have a mean
    under minus 2 SE). Where the baseline is not behind (a) on average there is no gap to cut: ratio and verdict
    are None."""
    gaps = [v - r for v, r in zip(values, reference, strict=True)]
    base_gaps = [b - r for b, r in zip(baseline, reference, strict=True)]
    if mean(base_gaps) <= 0:
        return mean(gaps), mean(base_gaps), None, None
    d, two_se, _ = paired_difference(gaps, [fraction * g for g in base_gaps])
    return mean(gaps), mean(base_gaps), mean(gaps) / mean(base_gaps), len(gaps) > 1 and d + two_se < 0


def paired_difference(values, reference):
    """Mean of the seed-by-seed differences, two standard errors of that mean, and whether it exceeds them."""
    d = [v - r for v, r in zip(values, reference, strict=True)]
    two_se = 2 * std(d) / len(d) ** 0.5
    return mean(d), two_se, len(d) > 1 and abs(mean(d)) > two_se


UNDER_HALF_LABELS = {True: "yes", False: "no", None: "no gap to cut"}  # gap_against_baseline's verdict


def write_report(results, runner, out_dir, scale_name, total_seconds, drift=(), recipe="paper", baseline=None):
    """results: {arm: [one result per seed]}; baseline: (recipe name, results of its DiLoCo arms) or None.
    Writes report.md, results.json, drift.json (and baseline.json) and the plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    # both recipes' stages: the baseline's re-run stages are in runner.redone too
    every_run = list(results.values()) + (list(baseline[1].values()) if baseline else [])
    all_stages = sorted({stage for runs in every_run for r in runs for stage in r["stages"]})
    stage_seconds = sum(runner.marker(stage)["seconds"] for stage in all_stages)
    redone = runner.redone
    seeds = [r["seed"] for r in next(iter(results.values()))]
    col = lambda arm, key: [r["row"][key] for r in results[arm]]
    by_stage = lambda arm, stage, key: mean([r["by_stage"][stage][key] for r in results[arm]])
    plots = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        plots.append(path)

    styles = ["-", "--", ":", "-."]  # arms that share a base model draw the same curve: keep both visible
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, runs) in enumerate(results.items()):
        curve = runs[0]["curve"]
        ax.plot([p["tokens"] for p in curve], [p["val_bpb"] for p in curve], marker="o", linestyle=styles[i % 4],
                label=ARM_LABELS[arm])
    ax.set_xlabel("pretraining tokens")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"Pretraining: val bpb vs tokens (seed {seeds[0]})")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "val_bpb_vs_tokens.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, runs) in enumerate(results.items()):
        points = [(bytes_across(p, runs[0]["sync"][0]), p["val_bpb"]) for p in runs[0]["curve"]]
        points = [(b, v) for b, v in points if b > 0]
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", linestyle=styles[i % 4], label=ARM_LABELS[arm])
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated across workers (all ranks, cumulative)")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"Pretraining: val bpb vs communication (seed {seeds[0]})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save(fig, "val_bpb_vs_bytes.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, arm in enumerate(results):
        axes[0].plot(STAGES, [by_stage(arm, st, "chat_val_bpb") for st in STAGES], marker="o", linestyle=styles[i % 4],
                     label=ARM_LABELS[arm])
        axes[1].plot(STAGES, [mean([by_stage(arm, st, f"{t} log p") for t in LOGP_TASKS]) for st in STAGES], marker="o",
                     linestyle=styles[i % 4], label=ARM_LABELS[arm])
    axes[0].set_ylabel("chat val bpb (assistant tokens, held-out conversations)")
    axes[1].set_ylabel("log p(right letter), mean of ARC-E, ARC-C, MMLU")
    for ax in axes:
        ax.set_xlabel("after stage")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"What each stage brings (mean of {len(seeds)} seed(s))")
    save(fig, "post_training.png")

    drift_summary = {}
    for rec in drift:
        drift_summary.setdefault((rec["pair"], rec["stage"]), []).append(rec)
    if drift:
        fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 4), sharey=True)
        for ax, stage in zip(axes, STAGES):
            for i, ((pair, st), recs) in enumerate((k, v) for k, v in drift_summary.items() if k[1] == stage):
                cka = [mean(layer) for layer in zip(*(r["cka"] for r in recs))]
                ax.plot(range(len(cka)), cka, marker="o", linestyle=styles[i % 4], label=pair)
            ax.set_title(f"after {stage}")
            ax.set_xlabel("layer (0 = embedding)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("linear CKA with arm (a)")
        axes[0].legend()
        save(fig, "drift_cka_per_layer.png")

    lines = ["# DDP vs DiLoCo: end-to-end comparison", ""]
    lines.append(f"Scale `{scale_name}`, seed(s) {', '.join(map(str, seeds))}; the stages of all arms took {stage_seconds:.0f} s "
                 f"of wall time when they ran (this invocation: {total_seconds:.0f} s; it re-ran {len(redone)} of "
                 f"{len(all_stages)} stages).")
    lines += ["", f"DiLoCo recipe `{recipe}` (diloco/recipes.py: {' '.join(RECIPES[recipe]) or 'the scale flags as they are'}). "
              + (f"Means over {len(seeds)} seeds." if len(seeds) > 1 else "One seed."), ""]
    lines.append("| arm | " + " | ".join(COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(COLUMNS))
    for arm in results:
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(fmt(k, mean(col(arm, k))) for k in COLUMNS) + " |")
    lines += ["", "Columns: val_bpb after pretraining (val shard); chat_bpb_base: the base model's bpb on the assistant "
              "tokens of the held-out chat conversations (before mid); mid_val_bpb: midtraining's own val bpb (every "
              "token of those conversations); sft_val_bpb: the SFT model on the same measure as chat_bpb_base; CORE of the "
              "base model; ARC/MMLU/GSM8K/HumanEval/ChatCORE of the SFT model; bytes_across_workers = bytes handed to "
              "cross-worker collectives by all ranks over pretraining + mid + SFT (DDP: the per-step gradient all-reduce; "
              "DiLoCo: the outer sync); wall_seconds = the arm's stages, including the shared ones.", ""]
    if len(seeds) > 1:
        lines += ["## Seeds: spread and differences from (a)", "",
                  f"Standard deviation over the {len(seeds)} seeds, and each arm's seed-by-seed (paired) difference from "
                  "(a) with two standard errors: a difference is marked real only when it exceeds them.", ""]
        keys = ["val_bpb", "chat_bpb_base", "mid_val_bpb", "sft_val_bpb", "ChatCORE"]
        lines += ["| arm | " + " | ".join(f"{k} (std)" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm in results:
            lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(f"{std(col(arm, k)):.4f}" for k in keys) + " |")
        if "ddp" in results:
            lines += ["", "| arm | measure | difference from (a) | 2 SE | real? |", "|---|---|---|---|---|"]
            for arm in results:
                if arm == "ddp":
                    continue
                for k in keys:
                    d, two_se, real = paired_difference(col(arm, k), col("ddp", k))
                    lines.append(f"| {ARM_LABELS[arm]} | {k} | {d:+.4f} | {two_se:.4f} | {'yes' if real else 'no'} |")
        lines.append("")
    baseline_rows = []
    if baseline and "ddp" in results:
        name, base_results = baseline
        lines += [f"## Against recipe `{name}`", "",
                  f"Each DiLoCo arm's gap to (a) with recipe `{recipe}`, against the same arm's gap with recipe `{name}` "
                  f"(same seeds, same arm (a)). 'under half' means the seed-by-seed differences gap - gap_{name} / 2 are "
                  "below zero by more than two standard errors; 'fewer bytes' is (a)'s bytes across workers over the arm's.",
                  "", f"| arm | measure | gap `{recipe}` | gap `{name}` | ratio | under half? | fewer bytes than (a) |",
                  "|---|---|---|---|---|---|---|"]
        for arm in results:
            if arm == "ddp" or arm not in base_results:
                continue
            fewer = mean(col("ddp", "bytes_across_workers")) / mean(col(arm, "bytes_across_workers"))
            for k in ["val_bpb", "chat_bpb_base", "mid_val_bpb", "sft_val_bpb"]:
                gap, base_gap, ratio, half = gap_against_baseline(
                    col(arm, k), [r["row"][k] for r in base_results[arm]], col("ddp", k))
                baseline_rows.append({"arm": arm, "measure": k, "gap": gap, "baseline_gap": base_gap, "ratio": ratio,
                                      "under_half": half, "fewer_bytes": fewer})
                lines.append(f"| {ARM_LABELS[arm]} | {k} | {gap:+.4f} | {base_gap:+.4f} | "
                             f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                             f"{UNDER_HALF_LABELS[half]} | {fewer:.1f}x |")
        lines.append("")
    lines += ["## What each stage brings", "",
              "After each stage: bpb on the assistant tokens of the held-out chat conversations (the same set for every "
              "arm and stage), and for the multiple-choice tasks the mean log-probability of the right letter among the "
              "question's letters (chance: about -1.386 for four letters) and the accuracy.", ""]
    heads = ["chat val bpb"] + [f"{t} log p" for t in LOGP_TASKS] + [f"{t} acc" for t in LOGP_TASKS]
    lines += ["| arm | after | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for arm in results:
        for stage in STAGES:
            lines.append(f"| {ARM_LABELS[arm]} | {stage} | " + " | ".join(
                f"{by_stage(arm, stage, 'chat_val_bpb' if h == 'chat val bpb' else h):.4f}" for h in heads) + " |")
    lines += ["", "![post-training](post_training.png)", ""]
    if drift:
        lines += ["## Drift between arms", "",
                  "Relative L2 distance of the weights, ||theta_a - theta_x|| / ||theta_a||, and linear CKA of the hidden "
                  "states (embedding and every block) on the first 4 rows of the val split, against arm (a) after each "
                  "stage (mean over seeds). 1 = the same representation up to rotation and scale.", "",
                  "| pair | after | relative L2 | mean CKA | CKA per layer |", "|---|---|---|---|---|"]
        for (pair, stage), recs in drift_summary.items():
            cka = [mean(layer) for layer in zip(*(r["cka"] for r in recs))]
            lines.append(f"| {pair} | {stage} | {mean([r['relative_l2'] for r in recs]):.4f} | {mean(cka):.4f} | "
                         + ", ".join(f"{c:.3f}" for c in cka) + " |")
        lines += ["", "![CKA per layer](drift_cka_per_layer.png)", ""]
    lines += ["![val bpb vs tokens](val_bpb_vs_tokens.png)", "", "![val bpb vs bytes](val_bpb_vs_bytes.png)", ""]
    first = next(iter(results.values()))[0]
    core = first["core_tasks"]
    lines += ["## CORE tasks", "", f"- source: {core['source']}", f"- used: {', '.join(core['used'] or [])}",
              f"- missing: {', '.join(core['missing'] or []) or 'none'}", ""]
    seed0 = {arm: runs[0] for arm, runs in results.items()}
    lines += ["## Hyper-parameters that differ between arms", ""]
    lines += ["| stage | flag | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for stage, key, values in differing_hyperparameters(seed0):
        lines.append(f"| {stage} | {key} | " + " | ".join(str(values[a]) for a in results) + " |")
    lines += ["", "## Shared hyper-parameters (pretraining)", ""]
    base_cfg = first["configs"]["base"]
    lines.append(", ".join(f"{k}={v}" for k, v in sorted(base_cfg.items()) if k not in ("sync",) and not k.startswith(("diloco", "outer"))))
    m = first["base_meta"]
    lines += ["", f"Model: {m['model_config']}", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in environment().items()]
    report = os.path.join(out_dir, "report.md")
    write_atomic(report, "\n".join(lines) + "\n")
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(
        {arm: {"mean": {k: mean(col(arm, k)) for k in COLUMNS}, "seeds": seeds, "runs": [r["row"] for r in runs],
               "by_stage": [r["by_stage"] for r in runs]} for arm, runs in results.items()}, indent=1))
    write_atomic(os.path.join(out_dir, "drift.json"), json.dumps(list(drift), indent=1))
    if baseline:
        write_atomic(os.path.join(out_dir, "baseline.json"), json.dumps(
            {"recipe": recipe, "baseline_recipe": baseline[0], "seeds": seeds, "rows": baseline_rows}, indent=1))
    return report, plots


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the DDP-vs-DiLoCo arms end to end and write a comparison report")
    parser.add_argument("--arms", default="ddp,diloco,diloco_ddp", help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--scale", choices=["auto", *SCALES], default="auto", help="auto: d20 on CUDA, tiny on CPU")
    parser.add_argument("--force", action="store_true", help="redo every stage even if done")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every arm this many times, with seeds --seed, --seed+1, ... (init and data order); the "
                             "report gives means, standard deviations and which differences exceed two standard errors")
    parser.add_argument("--out", default=None, help="report folder (default: <base>/compare)")
    parser.add_argument("--diloco-recipe", choices=list(RECIPES), default="paper",
                        help="flags of every DiLoCo stage from diloco/recipes.py (paper: the scale's H, outer lr 0.7, "
                             "Nesterov 0.9); the DiLoCo arms' checkpoints carry the recipe's name, arm (a) is shared")
    parser.add_argument("--baseline-recipe", choices=list(RECIPES), default=None,
                        help="also train (or reuse) the DiLoCo arms with this recipe, same seeds, and report each arm's gap "
                             "to (a) against the baseline's: ratio, and whether it is under half beyond two standard errors")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the stages a run would do (not done yet, changed flags, corrupted outputs or redone "
                             "inputs) with their commands, and run nothing")
    parser.add_argument("--diloco-flags", default="",
                        help="extra flags for every DiLoCo stage, e.g. \"--diloco-fragments 4 --diloco-overlap 1 "
                             "--outer-compression int4\" (stages whose flags changed are redone)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per stage (default: the scale's; d20: every GPU)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    scale = args.scale if args.scale != "auto" else ("d20" if torch.cuda.is_available() else "tiny")
    t0 = time.time()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be at least 1")
    if args.baseline_recipe and ("ddp" not in arms or arms == ["ddp"]):
        parser.error("--baseline-recipe compares DiLoCo arms' gaps to arm (a): --arms needs ddp and a DiLoCo arm")
    if args.baseline_recipe == args.diloco_recipe:
        parser.error(f"--baseline-recipe {args.baseline_recipe} is the --diloco-recipe itself: name another recipe")
    run = lambda recipe, runner=None: run_experiment(arms, scale, force=args.force, seed=args.seed,
                                                     diloco_flags=shlex.split(args.diloco_flags), seeds=args.seeds,
                                                     recipe=recipe, dry_run=args.dry_run, runner=runner, nproc=args.nproc)
    results, runner = run(args.diloco_recipe)
    baseline = None
    if args.baseline_recipe:  # arm (a) is shared between recipes: one runner, so it runs once (--force too)
        print(f"baseline: the DiLoCo arms with recipe {args.baseline_recipe} ...", flush=True)
        baseline = (args.baseline_recipe, run(args.baseline_recipe, runner)[0])
    if args.dry_run:
        print(f"dry run: {len(runner.redone)} stage(s) would run: {sorted(runner.redone) or 'none'}")
        return
    print("measuring the drift between arms ...", flush=True)
    drift = measure_drift(results)
    out = args.out or os.path.join(get_base_dir(), "compare")
    report, plots = write_report(results, runner, out, scale, time.time() - t0, drift, args.diloco_recipe, baseline)
    print(open(report).read())
    print(f"report: {report}\nplots: {', '.join(plots)}\nstages run this time: {sorted(runner.redone) or 'none'}")


if __name__ == "__main__":
    main()
