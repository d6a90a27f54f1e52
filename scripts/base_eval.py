"""
Evaluate a base model: CORE (DCLM's 22-task in-context-learning metric) and bits per byte on the train and
val splits. Results go to base_dir/eval/base_<tag>_step<N>.json and to the report's "Base model evaluation".

python -m scripts.base_eval                                   # latest base checkpoint, CORE and bpb
python -m scripts.base_eval --eval core --max-per-task 100    # a quick CORE
torchrun --nproc_per_node=2 -m scripts.base_eval -- --max-per-task 500

Offline (NANOCHAT_OFFLINE=1, or no network) CORE runs on the tasks that registry packages carry (20 of 22)
and says which are missing; that CORE is the mean over those tasks, not nanochat's number.
"""

import argparse
import json
import os

from nanochat.checkpoint import load_model
from nanochat.common import (autocast_context, autodetect_device_type, compute_cleanup, compute_init, exit_now,
                             get_base_dir, print0, write_atomic)
from nanochat.core_eval import CORE_TASKS, evaluate_core
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

parser = argparse.ArgumentParser(description="Base model evaluation: CORE metric and train/val bits per byte")
parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the latest written)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--eval", type=str, default="core,bpb", help="what to evaluate, comma-separated: core, bpb")
parser.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass for bpb")
parser.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens per split for bpb")
parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], help="empty: autodetect")
args = parser.parse_args()
evals = set(args.eval.split(","))
if not evals <= {"core", "bpb"}:
    parser.error(f"--eval takes core and/or bpb, got {args.eval!r}")

device_type = args.device_type or autodetect_device_type()
ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_context(device_type)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
model_tag, step = meta["model_tag"], meta["step"]
print0(f"base model {model_tag} step {step} | {model.num_params():,} parameters | sequence_len {model.config.sequence_len}")

# A re-run of one evaluation keeps the others' figures for this checkpoint
out_path = os.path.join(get_base_dir(), "eval", f"base_{model_tag}_step{step}.json")
record = {}
if os.path.exists(out_path):
    with open(out_path) as f:
        record = json.load(f)
record.update(model_tag=model_tag, step=step)

# Bits per byte on both splits
if "bpb" in evals:
    token_bytes = get_token_bytes(device=device)
    B, T = args.device_batch_size, model.config.sequence_len
    steps = max(1, args.split_tokens // (B * T * world_size))
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader(B, T, split, tokenizer, device)
        with autocast:
            record[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {record[f'{split}_bpb']:.4f} ({steps * B * T * world_size:,} tokens)")

# CORE
if "core" in evals:
    with autocast:
        core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
    record.update(core=core["core_metric"], core_source=core["source"], core_max_per_task=args.max_per_task,
                  core_results=core["results"], core_centered_results=core["centered_results"],
                  core_tasks_used=core["tasks_used"], core_tasks_missing=core["tasks_missing"])
    print0("=" * 64)
    print0(f"{'task':<34} {'accuracy':>10} {'centered':>10}")
    for label, accuracy in core["results"].items():
        print0(f"{label:<34} {accuracy:>10.4f} {core['centered_results'][label]:>+10.4f}")
    used = len(core["tasks_used"])
    print0(f"{'CORE':<34} {'':>10} {core['core_metric']:>+10.4f}   ({core['source']}: {used}/{len(CORE_TASKS)} tasks"
           + (f", missing {', '.join(core['tasks_missing'])})" if core["tasks_missing"] else ")"))

if rank == 0:
    write_atomic(out_path, json.dumps(record, indent=2))
    print0(f"results written to {out_path}")

summary = {"model_tag": model_tag, "step": step}
summary.update({k: record[k] for k in ("train_bpb", "val_bpb") if k in record})
data = [summary]
if "core" in record:
    summary.update({"CORE": record["core"], "CORE source": f"{record['core_source']} "
                    f"({len(record['core_tasks_used'])}/{len(CORE_TASKS)} tasks)", "CORE max per task": record["core_max_per_task"]})
    data.append(record["core_centered_results"])
    if record["core_tasks_missing"]:
        data.append(f"CORE tasks missing (no offline source): {', '.join(record['core_tasks_missing'])}; "
                    "CORE above is the mean over the tasks used.")
get_report().log(section="Base model evaluation", data=data)

compute_cleanup()
exit_now()  # skip native teardown (see nanochat.common.exit_now)
