"""The chat evaluation library (ChatCORE): each task's accuracy (categorical tasks by the answer letter the model
ranks first, generative ones by what the Engine samples), the chat val bpb and the ChatCORE score. Used by
scripts/chat_eval.py (its command line), scripts/chat_rl.py (pass@1 during RL) and scripts/compare.py (the task
list). Adding an eval task: the task in tasks/ and one line in load_task and TASK_NAMES (BASELINES)."""

import time

import torch
import torch.distributed as dist

from nanochat.comm import all_reduce_sum
from nanochat.common import autocast_context, print0

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
