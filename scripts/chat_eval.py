"""Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval, and their ChatCORE.

    python -m scripts.chat_eval -i sft                                  # every task, one process
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" --max-problems 200
    torchrun --nproc_per_node=8 -m scripts.chat_eval -i rl              # rank r takes problems r, r+W, ...

Multiple-choice tasks are scored categorically: one forward pass over a padded batch of prompts, and the
answer is the most likely of the question's letters at the last prompt position (nothing is sampled). They
also report the mean log-probability of the right letter among the question's letters, a score that moves
long before accuracy leaves chance (tiny models). --chat-bpb-batches N adds the bits per byte of the assistant's
tokens in the held-out chat conversations (the same set and measure as SFT's val bpb), so base, mid and SFT
checkpoints can be compared on one scale.
GSM8K and HumanEval generate an answer with the Engine (greedy at temperature 0) and grade it; HumanEval
runs the code in the sandbox. ChatCORE is the mean over the five tasks of (accuracy - chance) / (1 - chance).
"""

import argparse
import json
import os

from nanochat.checkpoint import load_model
from nanochat.common import (autodetect_device_type, compute_cleanup, compute_init, exit_now, get_base_dir, print0,
                             usage_errors, write_atomic)
from nanochat.decode import for_inference
from nanochat.engine import Engine
from nanochat.gpt import check_sampling
from nanochat.report import get_report
from nanochat.stage import STAGE_NAMES
from tasks.chat_eval import TASK_NAMES, chat_val_bpb, chatcore, load_task, run_chat_eval

def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, ChatCORE")
    parser.add_argument("-i", "--source", required=True, choices=STAGE_NAMES, help="which stage's checkpoint")
    parser.add_argument("--model-tag", default=None, help="model tag (default: the latest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-a", "--task-name", default="all", help=f"'all' or tasks joined by '|': {'|'.join(TASK_NAMES)}")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="questions per forward pass (categorical tasks)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--chat-bpb-batches", type=int, default=0,
                        help="also the chat val bpb (assistant tokens of the held-out conversations) over this many "
                             "batches of 4 per rank (0: off)")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    args = parser.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k)
    except ValueError as e:
        parser.error(str(e))

    names = TASK_NAMES if args.task_name == "all" else [n for n in args.task_name.split("|") if n]
    for name in names:
        if name not in TASK_NAMES:
            parser.error(f"unknown task {name!r}, expected 'all' or some of {'|'.join(TASK_NAMES)}")
    _, rank, _, world, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(for_inference(model), tokenizer)  # CUDA: bf16 weights, decoding as a CUDA graph
    print0(f"chat eval: {args.source}/{meta['model_tag']} step {meta['step']} | {world} rank(s) on {device} | "
           f"max problems {args.max_problems or 'all'}")

    results = {}
    for name in names:
        task, key = None, name
        held_out = meta.get("trained_on_test", {}).get(name)
        if held_out is not None:  # this checkpoint trained on part of the test split: score only the rest
            task = load_task(name, start=held_out["stop"])
            key = held_out["label"]
            print0(f"NOTE: this checkpoint trained on {name} test[:{held_out['stop']}]; {name} is scored on the "
                   f"held-out rest only and reported as {key!r}, not as {name}")
        results[key] = run_chat_eval(model, tokenizer, engine, name, args.max_problems, args.batch_size,
                                     args.num_samples, args.max_new_tokens, args.temperature, args.top_k, task=task)
        r = results[key]
        print0(f"{key}: {r['accuracy']:.4f} ({r['correct']}/{r['total']}) in {r['seconds']:.1f} s, "
               f"{r['problems_per_s']:.2f} problems/s")
    accuracies = {key: r["accuracy"] for key, r in results.items()}
    core = chatcore(accuracies)
    chat_bpb = None
    if args.chat_bpb_batches > 0:
        chat_bpb = chat_val_bpb(model, tokenizer, args.chat_bpb_batches)
        print0(f"chat val bpb (assistant tokens, {args.chat_bpb_batches} batches of 4 per rank): {chat_bpb:.4f}")

    print0(f"\n{'task':<26} {'accuracy':>9} {'correct':>13} {'log p(right)':>13} {'problems/s':>11}")
    for key, r in results.items():
        lp = f"{r['mean_logprob']:>13.4f}" if "mean_logprob" in r else f"{'-':>13}"
        print0(f"{key:<26} {r['accuracy']:>9.4f} {r['correct']:>6}/{r['total']:<6} {lp} {r['problems_per_s']:>11.2f}")
    print0(f"{'ChatCORE':<26} {core:>9.4f}" if core is not None else "ChatCORE: not computed (it needs all five tasks)")

    if rank == 0:
        path = os.path.join(get_base_dir(), "eval", f"chat_{args.source}_{meta['model_tag']}_step{meta['step']}.json")
        write_atomic(path, json.dumps({"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
                                       "world_size": world, "config": vars(args), "tasks": results, "ChatCORE": core,
                                       "chat_val_bpb": chat_bpb}, indent=2))
        print0(f"wrote {path}")
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
         "max_problems": args.max_problems or "all", "temperature": args.temperature, "num_samples": args.num_samples},
        {**accuracies, **({"ChatCORE": core} if core is not None else {}),
         **({"chat val bpb": chat_bpb} if chat_bpb is not None else {}),
         **{f"{key} log p(right)": r["mean_logprob"] for key, r in results.items() if "mean_logprob" in r}},
        {f"{key} problems/s": r["problems_per_s"] for key, r in results.items()},
    ])
    compute_cleanup()
    return results, core


if __name__ == "__main__":
    with usage_errors():  # e.g. no such checkpoint: one line saying which command makes it
        main()
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
