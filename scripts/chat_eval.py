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
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import load_model
from nanochat.comm import all_reduce_sum
from nanochat.common import (autocast_context, autodetect_device_type, compute_cleanup, compute_init, exit_now,
                             get_base_dir, print0)
from nanochat.decode import for_inference
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.stage import STAGE_NAMES

TASK_NAMES = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
# accuracy of guessing, subtracted out by ChatCORE (as nanochat: 4 choices, and nothing to guess in generation)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}


def load_task(name, **slice_kwargs):
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    makers = {"ARC-Easy": lambda: ARC("ARC-Easy", "test", **slice_kwargs),
              "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", **slice_kwargs),
              "MMLU": lambda: MMLU("all", "test", **slice_kwargs),
              "GSM8K": lambda: GSM8K("main", "test", **slice_kwargs),
              "HumanEval": lambda: HumanEval(**slice_kwargs)}
    if name not in makers:
        raise ValueError(f"unknown task {name!r}, expected one of {TASK_NAMES}")
    return makers[name]()


def fit_prompt(ids, limit):
    """A prompt of at most `limit` tokens: the first token (bos) and the last ones, which hold the end of the
    question and the choices. Only models with a context shorter than the prompts (tiny CPU models) need it."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]


def dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def categorical_predictions(model, tokenizer, prompts, letter_lists):
    """(index into its letters of the model's answer, log-probabilities of its letters among themselves) for
    each prompt, from one forward pass over the batch."""
    pad = tokenizer.get_bos_token_id()  # right padding: causal attention keeps it out of the real positions
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=model.get_device())
    logits = model(ids)
    picks = []
    for i, (prompt, letters) in enumerate(zip(prompts, letter_lists)):
        letter_ids = [letter_token_id(tokenizer, letter) for letter in letters]
        scores = logits[i, len(prompt) - 1, letter_ids].float()
        picks.append((int(scores.argmax()), torch.log_softmax(scores, dim=0).tolist()))
    return picks


def letter_token_id(tokenizer, letter):
    ids = tokenizer.encode(letter)
    assert len(ids) == 1, f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical eval needs one"
    return ids[0]


def run_categorical_eval(task, tokenizer, model, conversations, prompts, batch_size, progress):
    """(problems answered right, sum over problems of the log-probability of the right letter)."""
    correct, logprob = 0, 0.0
    for b in range(0, len(prompts), batch_size):
        batch = conversations[b:b + batch_size]
        picks = categorical_predictions(model, tokenizer, prompts[b:b + batch_size], [c["letters"] for c in batch])
        for conv, (pick, logprobs) in zip(batch, picks):
            correct += task.evaluate(conv, conv["letters"][pick])
            right = [i for i, letter in enumerate(conv["letters"]) if task.evaluate(conv, letter)]
            logprob += logprobs[right[0]]
        progress(min(b + batch_size, len(prompts)), correct)
    return correct, logprob


def run_generative_eval(task, tokenizer, engine, indices, conversations, prompts, num_samples, max_new_tokens,
                        temperature, top_k, progress):
    correct = 0
    for n, (i, conv, prompt) in enumerate(zip(indices, conversations, prompts)):
        # seeded by the problem, not the rank: any number of ranks samples the same completions
        completions, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=i)
        correct += int(any(task.evaluate(conv, tokenizer.decode(c)) for c in completions))  # pass@num_samples
        progress(n + 1, correct)
    return correct


def generation_prompt_limit(seq_len, max_new_tokens):
    return seq_len - min(max_new_tokens, seq_len // 2)  # leave the answer room even in a short context


def run_chat_eval(model, tokenizer, engine, task_name, max_problems=None, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, task=None):
    """Accuracy of the model on one task (pass@num_samples for generative ones), over the first max_problems.
    `task` overrides the task loaded by name (e.g. a held-out slice). With a process group, rank r of W
    evaluates problems r, r+W, ... and the counts are summed, so every rank returns the same figures.
    Returns {"accuracy", "correct", "total", "cropped" (prompts cut to fit the context), "seconds", "problems_per_s"},
    and for categorical tasks "mean_logprob": the mean log-probability of the right letter among the letters."""
    task = load_task(task_name) if task is None else task
    rank, world = dist_rank_world()
    total = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(rank, total, world))
    t0 = time.time()

    def progress(done, correct):
        rate = done / max(time.time() - t0, 1e-9)
        end = "\n" if done == len(indices) else ""
        print0(f"\r{task_name}: {done}/{len(indices)} (rank 0 of {world}) | acc {correct / done:.2%} | "
               f"{rate:.1f} problems/s", end=end)

    seq_len = model.config.sequence_len
    limit = seq_len if task.eval_type == "categorical" else generation_prompt_limit(seq_len, max_new_tokens)
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    cropped = sum(len(p) > limit for p in prompts)
    prompts = [fit_prompt(p, limit) for p in prompts]
    model.eval()
    with autocast_context(model.get_device().type):
        logprob = None
        if task.eval_type == "categorical":
            correct, logprob = run_categorical_eval(task, tokenizer, model, conversations, prompts, batch_size, progress)
        else:
            correct = run_generative_eval(task, tokenizer, engine, indices, conversations, prompts, num_samples,
                                          max_new_tokens, temperature, top_k, progress)
    counts = torch.tensor([correct, len(indices), cropped], dtype=torch.long, device=model.get_device())
    all_reduce_sum(counts)
    correct, counted, cropped = counts.tolist()
    if logprob is not None:
        logprob = torch.tensor(logprob, dtype=torch.float64, device=model.get_device())
        all_reduce_sum(logprob)
        logprob = logprob.item()
    assert counted == total, f"ranks evaluated {counted} problems, expected {total}"
    seconds = time.time() - t0
    if cropped:
        print0(f"NOTE: {task_name}: {cropped} of {total} prompts exceed the model's context for this eval ({limit} tokens) "
               f"and kept only their first token and last {limit - 1} tokens")
    out = {"accuracy": correct / max(total, 1), "correct": correct, "total": total, "cropped": cropped,
           "seconds": seconds, "problems_per_s": total / max(seconds, 1e-9)}
    if logprob is not None:
        out["mean_logprob"] = logprob / max(total, 1)
    return out


def chat_val_bpb(model, tokenizer, batches, batch_size=4):
    """Bits per byte of the assistant's tokens in the held-out chat conversations (validation_task), over
    `batches` padded batches per rank: the conversations, order and measure of SFT's val bpb."""
    from nanochat.dataloader import conversation_padded_loader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    from tasks.mixtures import validation_task
    rank, world = dist_rank_world()
    device = model.get_device()
    loader = conversation_padded_loader(validation_task(), tokenizer, batch_size, model.config.sequence_len, device,
                                        rank, world)
    model.eval()
    with autocast_context(device.type):
        return evaluate_bpb(model, loader, batches, get_token_bytes(device=device))


def chatcore(accuracies):
    """Mean centered accuracy over all five tasks; None unless every one of them was evaluated."""
    if set(accuracies) != set(TASK_NAMES):
        return None
    return sum((accuracies[n] - BASELINES[n]) / (1 - BASELINES[n]) for n in TASK_NAMES) / len(TASK_NAMES)


def write_json_atomic(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


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

    names = TASK_NAMES if args.task_name == "all" else [n for n in args.task_name.split("|") if n]
    for name in names:
        if name not in TASK_NAMES:
            parser.error(f"unknown task {name!r}, expected 'all' or some of {'|'.join(TASK_NAMES)}")
    _, rank, _, world, device = compute_init(args.device_type or autodetect_device_type())
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
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
        write_json_atomic(path, {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
                                 "world_size": world, "config": vars(args), "tasks": results, "ChatCORE": core,
                                 "chat_val_bpb": chat_bpb})
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
    main()
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
