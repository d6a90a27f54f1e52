"""Reinforcement learning on GSM8K from an SFT checkpoint: on-policy policy gradient, as nanochat does.

    python -m scripts.chat_rl                                       # one process
    torchrun --nproc_per_node=8 -m scripts.chat_rl --sync diloco --diloco-h 20

Each step, every prompt gets --num-samples completions from the Engine; each completion's reward is the
task's (GSM8K: 1 for the right final answer), its advantage is the reward minus the mean reward of its
prompt's samples (REINFORCE with a per-prompt baseline, a simple GRPO), and the loss is
-sum(advantage * log-prob of each sampled token) / number of sampled tokens. Prompt tokens and tool outputs
forced in by the Engine are not the policy's actions and take no gradient. pass@1 (greedy) on held-out
problems is evaluated every --eval-every steps. Synchronisation is DDP or DiLoCo, the same flags as base_train.

Offline there is no GSM8K train split (shared DATA.md): RL then trains on the FIRST half of the test split
and evaluates only on the SECOND half, reported as "GSM8K test[second half]"; the checkpoint records this,
so chat_eval scores this model's GSM8K on the second half only.
"""

import argparse
import time

import torch

from nanochat.checkpoint import checkpoint_dir, load_model, restore_training, save_training
from nanochat.comm import all_reduce_sum, global_comm_stats
from nanochat.common import UsageError, autocast_context, compute_cleanup, exit_now, get_dist_info, print0, usage_errors
from nanochat.engine import Engine
from nanochat.memory import explain_out_of_memory
from nanochat.report import get_report
from nanochat.runner import RunConfig, StageRun
from nanochat.stage import STAGE_NAMES, STAGES
from nanochat.train_loop import MetricsLog, bytes_across_workers, set_schedule, train_steps
from scripts import flags
from scripts.sync_choice import sync_lib
from tasks.chat_eval import fit_prompt, generation_prompt_limit, run_chat_eval


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RL on GSM8K (policy gradient) from an SFT checkpoint, DDP or DiLoCo")
    parser.add_argument("-i", "--source", default="sft", choices=STAGE_NAMES, help="checkpoint to start from")
    parser.add_argument("--model-tag", default=None, help="model tag of the source (default: the latest)")
    parser.add_argument("--output-tag", default=None, help="rl checkpoint folder (default: the source's model tag)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--run", default="", help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=1337)
    # rollouts
    parser.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1: one pass over the training prompts)")
    parser.add_argument("--examples-per-step", type=int, default=16, help="prompts per step, over all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward pass")
    # optimisation: nanochat's lrs scaled by --init-lr-frac, decaying linearly to 0
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init-lr-frac", type=float, default=0.05)
    # evaluation and checkpoints
    parser.add_argument("--eval-every", type=int, default=60, help="steps between pass@1 evals (0: start and end only)")
    parser.add_argument("--eval-examples", type=int, default=400, help="held-out problems per eval")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last rl checkpoint of --output-tag")
    parser.add_argument("--stop-after", type=int, default=-1,
                        help="save and exit after this step without changing the schedule (time-sliced jobs)")
    sync_lib.add_sync_args(parser)
    return parser.parse_args(argv)


def gsm8k_split():
    """(train task, eval task, eval label, trained-on-test record or None)."""
    from tasks.common import NotAvailableOffline
    from tasks.gsm8k import GSM8K
    try:
        return GSM8K("main", "train"), GSM8K("main", "test"), "GSM8K test", None
    except NotAvailableOffline:
        half = len(GSM8K("main", "test")) // 2
        label = "GSM8K test[second half]"
        print0("=" * 100)
        print0(f"OFFLINE: there is no GSM8K train split. RL TRAINS ON GSM8K TEST[:{half}] (the first half) and "
               f"evaluates ONLY on test[{half}:],\nreported as {label!r}. This is NOT the GSM8K test score.")
        print0("=" * 100)
        return (GSM8K("main", "test", stop=half), GSM8K("main", "test", start=half), label,
                {"GSM8K": {"stop": half, "label": label}})


def rollout(engine, tokenizer, conversation, num_samples, max_new_tokens, temperature, top_k, seed):
    """(prompt ids, completions, masks): each completion ends with its stop token when it stopped (ending is an
    action too); mask 0 marks tokens forced by the tool."""
    seq_len = engine.model.config.sequence_len
    prompt = fit_prompt(tokenizer.render_for_completion(conversation), generation_prompt_limit(seq_len, max_new_tokens))
    completions, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for column, column_masks in engine.generate(prompt, num_samples, max_tokens=max_new_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed):
        for i, (token, mask) in enumerate(zip(column, column_masks)):
            if not done[i]:
                completions[i].append(token)
                masks[i].append(mask)
                done[i] = token in engine.stop_tokens
        if all(done):
            break
    return prompt, completions, masks


def policy_gradient_backward(model, sequences, device_batch_size):
    """sequences: (ids, mask, advantage) with mask 1 on the sampled tokens. Accumulates the gradient of
    -sum(advantage * log p(sampled token)) / number of sampled tokens; returns that loss."""
    device = model.get_device()
    num_tokens = max(1, sum(sum(mask[1:]) for _, mask, _ in sequences))
    total = 0.0
    for b in range(0, len(sequences), device_batch_size):
        chunk = sequences[b:b + device_batch_size]
        width = max(len(ids) for ids, _, _ in chunk) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)
        for row, (ids, mask, _) in enumerate(chunk):
            n = len(ids) - 1
            inputs[row, :n] = torch.tensor(ids[:-1])
            targets[row, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        advantages = torch.tensor([adv for _, _, adv in chunk], dtype=torch.float32, device=device)
        with autocast_context(device.type):
            logp = -model(inputs.to(device), targets.to(device), loss_reduction="none")  # 0 where target is -1
        loss = -(logp * advantages[:, None]).sum() / num_tokens
        loss.backward()
        total += loss.item()
    return total


def train_rl(model, tokenizer, optimizers, sync, train_task, eval_task, eval_label, args, save=None, log=None,
             resume=None):
    """Run the RL loop (train_loop.train_steps, each step's data its own rollouts); returns (history, finished):
    the history has {"step", "reward", ...} per step and {"step", "pass@1", ...} per eval; finished is False when
    --stop-after ended it early. train_task: a task with __len__, __getitem__ and reward(conversation, text);
    eval_task: for run_chat_eval. save(step, state) is called (on every rank, the model holding theta_global) at
    checkpoint steps with the loop's own state; resume=(step, state) continues from one, the caller having restored
    the weights, optimizers and sync. log(record) receives every new record."""
    _, rank, _, world = get_dist_info()
    engine = Engine(model, tokenizer)
    if args.examples_per_step % world:
        raise UsageError(f"--examples-per-step {args.examples_per_step} must be a multiple of the {world} ranks")
    num_steps = args.num_steps if args.num_steps >= 0 else len(train_task) // args.examples_per_step
    sync.set_total_steps(num_steps)  # the outer schedule may end differently
    device = model.get_device()
    start_step, state = resume or (0, {"history": [], "window": [0.0, 0.0]})
    history = list(state["history"])
    window = torch.tensor(state["window"], dtype=torch.float64, device=device)  # rewards since the last eval: sum, count
    rolled = {}  # this step's rollouts, for its record

    def record(entry):
        history.append(entry)
        if log:
            log(entry)

    def at_checkpoint(step, at):  # on theta_global, every rank
        if at.eval:
            result = run_chat_eval(model, tokenizer, engine, eval_label, max_problems=args.eval_examples,
                                   max_new_tokens=args.max_new_tokens, temperature=0.0, task=eval_task)
            all_reduce_sum(window)
            mean_reward = (window[0] / window[1]).item() if window[1] > 0 else None
            window.zero_()
            print0(f"step {step:05d} | {eval_label} pass@1 {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
                   + (f" | train reward since last eval (all ranks) {mean_reward:.4f}" if step > 0 else ""))
            record({"step": step, "pass@1": result["accuracy"], "eval_total": result["total"],
                    "window_reward": mean_reward})
        if at.save and save is not None:
            save(step, {"history": history, "window": window.tolist()})

    def backward(step):
        """This rank's prompts of the step, --num-samples rollouts each, then the policy gradient."""
        model.eval()
        sequences, rewards, lengths, informative = [], [], [], 0
        for k in range(rank, args.examples_per_step, world):
            slot = step * args.examples_per_step + k
            conversation = train_task[slot % len(train_task)]
            prompt, completions, masks = rollout(engine, tokenizer, conversation, args.num_samples, args.max_new_tokens,
                                                 args.temperature, args.top_k, seed=args.seed + slot)
            texts = [tokenizer.decode([t for t in c if t not in engine.stop_tokens]) for c in completions]
            prompt_rewards = [float(train_task.reward(conversation, text)) for text in texts]
            baseline = sum(prompt_rewards) / len(prompt_rewards)
            for completion, mask, reward in zip(completions, masks, prompt_rewards):
                sequences.append((prompt + completion, [0] * len(prompt) + mask, reward - baseline))
            rewards += prompt_rewards
            informative += sum(reward != baseline for reward in prompt_rewards)
            lengths += [len(c) for c in completions]
        model.train()
        rolled.update(rewards=rewards, lengths=lengths, informative=informative)
        return policy_gradient_backward(model, sequences, args.device_batch_size)

    def schedule(step):
        lrm = 1.0 - step / num_steps
        set_schedule(optimizers, lrm)  # Muon's momentum stays 0.95, as in nanochat's chat_rl (see chat_train.py)
        return lrm

    def on_step(step, loss, lrm, dt, opt_dt):
        rewards, lengths = rolled["rewards"], rolled["lengths"]
        mean_reward, mean_length = sum(rewards) / len(rewards), sum(lengths) / len(lengths)
        window.add_(torch.tensor([sum(rewards), len(rewards)], dtype=torch.float64, device=device))
        print0(f"step {step + 1:05d}/{num_steps:05d} | reward {mean_reward:.4f} | loss {loss:+.5f} | "
               f"length {mean_length:.1f} | lrm {lrm:.2f} | dt {dt * 1000:.0f} ms | opt {opt_dt * 1000:.0f} ms "
               "(this rank)")
        record({"step": step + 1, "reward": mean_reward, "informative": rolled["informative"], "loss": loss,
                "length": mean_length, "dt": dt, "opt_seconds": opt_dt, "outer_wait_seconds": sync.wait_seconds})

    # --eval-every 0: evals at the start and the end only
    _, at = train_steps(sync, start_step, num_steps, 1, None, None, schedule, device_type=device.type,
                        resumed=resume is not None, stop_after=args.stop_after, eval_every=args.eval_every or num_steps,
                        save_every=args.save_every, at_checkpoint=at_checkpoint, on_step=on_step, backward=backward)
    return history, at.last


def main(argv=None):
    args = parse_args(argv)
    sync_config = flags.sync_config(args)
    if sync_config.elastic is not None:  # refused rather than silently wrong
        raise UsageError("chat_rl does not take --elastic: its prompts are dealt by rank within one torchrun job, so "
                         "every elastic worker would roll out the same prompts; run RL with a fixed set of workers "
                         "(--sync diloco without --elastic)")
    run = StageRun("rl", RunConfig(device_type=args.device_type, run=args.run, seed=args.seed, compile=0), sync_lib,
                   sync_config, vars(args), "nanochat-diloco-rl")
    explain_out_of_memory(args.device_batch_size)  # an OOM names the micro-batch to lower
    model, tokenizer, meta = load_model(args.source, run.device, phase="train", model_tag=args.model_tag, step=args.step)
    print0(f"RL from {args.source}/{meta['model_tag']} step {meta['step']} | {model.num_params():,} parameters | "
           f"{run.world_size} rank(s), sync {args.sync}")
    train_task, eval_task, eval_label, trained_on_test = gsm8k_split()
    run.setup(model, init_lr_frac=args.init_lr_frac, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
              matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    sync = run.sync

    # RL's checkpoint holds no data position (its data are its rollouts, seeded by slot) but the loop's own state
    ckpt_dir = checkpoint_dir("rl", args.output_tag or meta["model_tag"])
    resume, seconds_before = None, 0.0
    if args.resume:  # the weights, optimizers and sync, then the loop's step, history and reward window
        step, rl_meta, extra = restore_training(ckpt_dir, model, run.optimizers, sync, run.device, run.rank)
        resume, seconds_before = (step, extra["loop"]), rl_meta["train_seconds"]
    metrics = MetricsLog(ckpt_dir, run.wandb_run, run.master, resumed_at=resume[0] if resume else None)
    last_eval = next((entry for entry in reversed(resume[1]["history"] if resume else []) if "pass@1" in entry), {})

    def log(entry):
        if "pass@1" in entry:
            last_eval.update(entry)
        metrics.log(entry)

    t0 = time.time() - seconds_before

    def save(step, loop_state):
        rl_meta = {"model_config": meta["model_config"], "user_config": vars(args), "stage": "rl",
                   "parent": {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"]},
                   "eval_label": eval_label, "pass@1": last_eval.get("pass@1"), "world_size": run.world_size,
                   "sync": sync.mode, "trained_on_test": trained_on_test or {}, "train_seconds": time.time() - t0}
        save_training(ckpt_dir, step, model, run.optimizers, sync, rl_meta, run.rank, extra={"loop": loop_state})

    history, finished = train_rl(model, tokenizer, run.optimizers, sync, train_task, eval_task, eval_label, args,
                                 save=save, log=log, resume=resume)
    seconds = time.time() - t0
    if not finished:
        print0(f"stopped after step {args.stop_after}: continue with --resume")
        compute_cleanup()
        return history

    rewards = [h["reward"] for h in history if "reward" in h]
    evals = [h for h in history if "pass@1" in h]
    tenth = max(1, len(rewards) // 10)
    first, final = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    summary = {"steps": len(rewards), f"reward first {tenth} steps (rank 0)": first,
               f"reward last {tenth} steps (rank 0)": final,
               f"{eval_label} pass@1 at start": evals[0]["pass@1"], f"{eval_label} pass@1 at end": evals[-1]["pass@1"],
               "eval problems": evals[-1]["eval_total"], "seconds": seconds, "outer_wait_seconds": sync.wait_seconds}
    informative = torch.tensor([sum(h["informative"] for h in history if "reward" in h)], device=run.device)
    all_reduce_sum(informative)
    summary["bytes_across_workers"] = bytes_across_workers(sync, global_comm_stats())  # collective: every rank
    summary["samples with a nonzero advantage (all ranks)"] = informative.item()
    if informative.item() == 0:  # say so rather than let a flat curve pass for training
        verdict = ("all samples of each prompt got the same reward: every advantage was 0, the policy gradient "
                   "vanished and RL did not change the model (a model that solves none of the training problems "
                   "gets no learning signal)")
    elif final > first:
        verdict = f"mean reward rose from {first:.4f} to {final:.4f}"
    else:
        verdict = f"mean reward did not improve ({first:.4f} -> {final:.4f})"
    print0(f"done: {verdict}")
    get_report().log(section=STAGES["rl"].section, data=[
        {"source": f"{args.source}/{meta['model_tag']} step {meta['step']}", "ranks": run.world_size, "sync": sync.mode,
         "examples_per_step": args.examples_per_step, "num_samples": args.num_samples, "train split":
         "GSM8K test[first half] (offline: no train split)" if trained_on_test else "GSM8K train"},
        summary, verdict])
    run.wandb_run.finish()
    compute_cleanup()
    return history

if __name__ == "__main__":
    with usage_errors():  # a flag or checkpoint that cannot work: one line, exit 1
        main()
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
