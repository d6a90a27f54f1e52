"""The two conversation-training stages, with DDP or DiLoCo synchronisation:

  mid  (scripts/mid_train.py): from a base model; conversations packed into a token stream and every token
       trained, like pretraining, so the model picks up the chat format, tool calls and multiple choice.
  sft  (scripts/chat_sft.py): from a mid model; whole conversations, padded, loss on the assistant's tokens
       only; the learning rate starts low and decays linearly to zero.

Both continue from a checkpoint of either sync mode and save their own checkpoint and report section.
"""

import argparse
import json
import os
import time

import torch

from nanochat import comm
from nanochat.checkpoint import checkpoint_dir, load_model, restore_training, save_training
from nanochat.common import (autocast_context, autodetect_device_type, compute_cleanup, compute_init,
                             device_synchronize, init_wandb, print0)
from nanochat.dataloader import (conversation_padded_loader, conversation_stream_loader, count_conversation_tokens,
                                 fresh_loader_state, global_loader_state)
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import (batch_size_arg, candidate_batch_sizes, explain_out_of_memory, find_device_batch_size,
                             training_step_trial)
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import (lr_multiplier, metrics_until, muon_momentum, on_theta_global, plan, scale_initial_lrs,
                                 set_schedule)
from scripts.sync_choice import sync_lib
from tasks.mixtures import training_mixture, validation_task

STAGES = {
    "mid": dict(description="Midtrain a base model on conversation mixtures (DDP or DiLoCo)", source="base",
                section="Midtraining", loader=conversation_stream_loader, init_lr_frac=1.0, eval_every=150,
                device_batch_size=None, examples_per_step=None),  # micro-batch None: 32 on CUDA, 16 elsewhere
    "sft": dict(description="Fine-tune a mid (or base) model on conversations (DDP or DiLoCo)", source="mid",
                section="Chat SFT", loader=conversation_padded_loader, init_lr_frac=0.02, eval_every=100,
                device_batch_size=4, examples_per_step=32),
}


def parse_args(stage, argv=None):
    s = STAGES[stage]
    parser = argparse.ArgumentParser(description=s["description"])
    parser.add_argument("--source", choices=["base", "mid", "sft"], default=s["source"], help="stage to start from")
    parser.add_argument("--model-tag", default=None, help="tag of the checkpoint to start from (default: latest)")
    parser.add_argument("--step", type=int, default=None, help="step of the checkpoint to start from (default: last)")
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: --model-tag)")
    parser.add_argument("--device-type", default="")
    parser.add_argument("--run", default="", help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data-seed", type=int, default=0,
                        help="order of the training conversations: 0 = the mixture's own, N > 0 = a permutation drawn from N")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs of the mixture)")
    parser.add_argument("--num-epochs", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the model's)")
    parser.add_argument("--device-batch-size", type=batch_size_arg, default=None,
                        help="rows per rank per micro-step, or auto: the largest power of two up to " +
                             ("32 on CUDA (16 elsewhere)" if stage == "mid" else str(s["device_batch_size"])) +
                             " that fits in memory (default: auto on CUDA, else that value)")
    parser.add_argument("--examples-per-step", type=int, default=s["examples_per_step"],
                        help="rows per optimizer step, all ranks (default: one micro-step of --device-batch-size on every "
                             "rank; with auto, of the largest it may choose)"
                        if stage == "mid" else "conversations per optimizer step, all ranks")
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--init-lr-frac", type=float, default=s["init_lr_frac"], help="all lrs scaled by this")
    parser.add_argument("--eval-every", type=int, default=s["eval_every"], help="steps between val bpb evals (0: only at the end)")
    parser.add_argument("--eval-batches", type=int, default=20, help="val batches per eval and rank")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --output-tag")
    parser.add_argument("--stop-after", type=int, default=-1,
                        help="save and exit after this step without changing the schedule (time-sliced jobs)")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=-1, help="torch.compile (default: on CUDA)")
    sync_lib.add_sync_args(parser)
    return parser.parse_args(argv)


def main(stage, argv=None):
    args = parse_args(stage, argv)
    s = STAGES[stage]
    device_type = args.device_type or autodetect_device_type()
    explain_out_of_memory()  # from here on an OOM ends the run with one line saying what to try
    ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed, timeout_s=args.collective_timeout)
    master = rank == 0
    autocast = autocast_context(device_type)
    wandb_run = init_wandb(args.run, f"nanochat-diloco-{stage}", vars(args), master)

    model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.step)
    output_tag = args.output_tag or source_meta["model_tag"]
    token_bytes = get_token_bytes(device=device)
    T = args.max_seq_len or model.config.sequence_len
    largest_B = s["device_batch_size"] or (32 if device_type == "cuda" else 16)
    B = args.device_batch_size or ("auto" if device_type == "cuda" else largest_B)
    examples_per_step = args.examples_per_step or (largest_B if B == "auto" else B) * world_size
    if examples_per_step % world_size:
        raise SystemExit(f"error: --examples-per-step {examples_per_step} must be a multiple of the {world_size} ranks")

    sync_config = sync_lib.sync_config_from_args(args)
    groups = sync_lib.make_worker_groups(sync_config)
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, process_group=groups.inner)
    scale_initial_lrs(optimizers, args.init_lr_frac)
    sync = sync_lib.make_sync(sync_config, model, optimizers, groups)
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    def micro_step(x, y):
        with autocast:  # mean over the batch's targets; an sft batch cut before any answer contributes 0
            return train_model(x, y, loss_reduction="none").sum() / (y >= 0).sum().clamp(min=1)

    rows_per_rank = examples_per_step // world_size  # the micro-batch divides it: accumulation keeps the total
    if B == "auto":
        trial = training_step_trial(micro_step, model, optimizers, T, device, reserve_bytes=sync.later_device_bytes())
        B, too_big = find_device_batch_size(trial, candidate_batch_sizes(rows_per_rank, largest_B), device)
        print0(f"--device-batch-size auto: {B}" + (f" ({', '.join(map(str, too_big))} ran out of memory)" if too_big else " (fits)"))
    if rows_per_rank % B:
        raise SystemExit(f"error: --device-batch-size {B} must divide the {rows_per_rank} rows each rank takes per step "
                         f"(--examples-per-step / ranks)")
    args.device_batch_size = B  # as chosen, for the checkpoint's metadata
    explain_out_of_memory(B)
    grad_accum_steps = rows_per_rank // B

    mixture, used, missing = training_mixture(stage)
    for name, n in used:
        print0(f"mixture: {name}: {n:,} conversations")
    for name in missing:
        print0(f"mixture: {name}: NOT AVAILABLE offline, left out")
    val_task = validation_task()
    num_iterations = args.num_iterations
    if num_iterations < 0:  # an epoch: packed rows of the whole mixture (mid), or its conversations (sft)
        rows = count_conversation_tokens(mixture, tokenizer, T) // T if stage == "mid" else len(mixture)
        num_iterations = max(1, args.num_epochs * rows // examples_per_step)
    sync.set_total_steps(num_iterations)  # the outer schedule may end differently
    print0(f"{stage} from {args.source}/{source_meta['model_tag']} step {source_meta['step']} | {num_iterations} steps x "
           f"{examples_per_step} rows of {T} tokens | sync {args.sync}")
    ckpt_dir = checkpoint_dir(stage, output_tag)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    layout = {"world_size": world_size, "workers": groups.num_workers}  # another layout resumes from the shared state
    start_step, metrics, train_seconds, val_bpb = 0, [], 0.0, float("nan")
    loader_state = fresh_loader_state(rank, world_size)
    comm.reset_comm_stats()
    if args.resume:
        start_step, meta, extra = restore_training(ckpt_dir, model, optimizers, sync, device, rank, layout)
        if "loader" not in extra:
            raise SystemExit(f"--resume: {ckpt_dir} predates world-size-independent data positions: run without --resume")
        loader_state = extra["loader"]
        metrics = metrics_until(metrics_path, start_step)
        train_seconds, val_bpb = meta["train_seconds"], meta["val_bpb"]

    def lrm_at(it):  # sft: a linear decay to zero; mid: constant, then the last 20 % decays to zero
        return 1.0 - it / num_iterations if stage == "sft" else lr_multiplier(it, num_iterations, 0.0, 0.2, 0.0)

    def evaluate():
        """bits per byte of the held-out conversations' target tokens (sft: the assistant's only)"""
        model.eval()
        val_loader = s["loader"](val_task, tokenizer, B, T, device, rank, world_size)
        with autocast:
            bpb = evaluate_bpb(model, val_loader, args.eval_batches, token_bytes)
        model.train()
        return bpb

    def save(step):
        stats = comm.global_comm_stats()
        meta = {"model_config": vars(model.config), "user_config": vars(args), "stage": stage, "source": args.source,
                "source_tag": source_meta["model_tag"], "source_step": source_meta["step"], "val_bpb": val_bpb,
                "rows": step * examples_per_step, "train_seconds": train_seconds, "sync": args.sync,
                "inner_bytes": stats["inner"]["bytes"], "outer_bytes": stats["outer"]["bytes"],
                "bytes_across_workers": stats[sync.across_workers]["bytes"],
                "mixture": used, "missing": missing}
        save_training(ckpt_dir, step, model, optimizers, sync, meta, rank, extra={"loader": loader_state},
                      shared={"loader": global_loader_state(loader_state)}, layout=layout)
        if master:
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in metrics)
            os.replace(metrics_path + ".tmp", metrics_path)
        return meta

    train_loader = s["loader"](mixture, tokenizer, B, T, device, rank, world_size, resume_state=loader_state,
                               data_seed=args.data_seed)
    for step in range(start_step, num_iterations + 1):
        at = plan(step, num_iterations, resumed_at=start_step if args.resume else None, stop_after=args.stop_after,
                  eval_every=args.eval_every, save_every=args.save_every)
        if at.eval or at.save:
            with on_theta_global(sync, at.last):  # collective: every rank takes part
                if at.eval:
                    val_bpb = evaluate()
                    print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
                    metrics.append({"step": step, "rows": step * examples_per_step, "val_bpb": val_bpb})
                if at.save:
                    meta = save(step)
        if at.stop:
            break
        device_synchronize(device_type)
        t0 = time.time()
        for _ in range(grad_accum_steps):
            x, y, loader_state = next(train_loader)
            epoch = loader_state["epoch"]
            loss = micro_step(x, y)
            (loss / grad_accum_steps).backward()
        lrm = lrm_at(step)
        # mid restarts Muon from an empty momentum buffer at the full pretraining lr, so it warms the momentum up
        # as base does (and nanochat's mid_train); sft starts at 2 % of that lr and nanochat keeps 0.95 there
        set_schedule(optimizers, lrm, muon_momentum(step) if stage == "mid" else None)
        sync.step()
        device_synchronize(device_type)
        dt = time.time() - t0
        train_seconds += dt
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {loss.item():.4f} | lrm {lrm:.2f} | epoch {epoch} | "
               f"dt {dt * 1000:.0f} ms")
        metrics.append({"step": step + 1, "loss": loss.item(), "outer_wait_seconds": sync.wait_seconds})
        wandb_run.log({"step": step + 1, "loss": loss.item(), "lrm": lrm})

    if not at.last:
        print0(f"stopped after step {step}: continue with --resume")
        compute_cleanup()
        return
    get_report().log(section=s["section"], data=[
        {"source": f"{args.source}/{source_meta['model_tag']} step {source_meta['step']}", "sync": args.sync,
         **({"diloco_h": args.diloco_h, "workers": groups.num_workers} if args.sync == "diloco" else {})},
        {name: n for name, n in used}, {"missing offline": ", ".join(missing) or "none"},
        {"steps": num_iterations, "rows": num_iterations * examples_per_step, "val_bpb": val_bpb,
         "train_seconds": train_seconds, "outer_wait_seconds": sync.wait_seconds,
         "bytes_across_workers": meta["bytes_across_workers"]},
    ])
    peak = f", peak memory allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if device_type == "cuda" else ""
    print0(f"done: val bpb {val_bpb:.4f}, {train_seconds:.1f} s{peak}, checkpoint {ckpt_dir}")
    wandb_run.finish()
    compute_cleanup()
