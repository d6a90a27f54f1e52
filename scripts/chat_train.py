"""The two conversation-training stages, with DDP or DiLoCo synchronisation:

  mid  (scripts/mid_train.py): from a base model; conversations packed into a token stream and every token
       trained, like pretraining, so the model picks up the chat format, tool calls and multiple choice.
  sft  (scripts/chat_sft.py): from a mid model; whole conversations, padded, loss on the assistant's tokens
       only; the learning rate starts low and decays linearly to zero.

Both continue from a checkpoint of either sync mode and save their own checkpoint and report section.
"""

import argparse

import torch

from nanochat import comm
from nanochat.checkpoint import checkpoint_dir, load_model, restore_training, save_training
from nanochat.common import (UsageError, autocast_context, autodetect_device_type, compute_cleanup, compute_init,
                             exit_now, init_wandb, print0, usage_errors)
from nanochat.dataloader import (conversation_padded_loader, conversation_stream_loader, count_conversation_tokens,
                                 fresh_loader_state, global_loader_state)
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import explain_out_of_memory
from nanochat.report import get_report
from nanochat.stage import STAGE_NAMES, STAGES
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import (MetricsLog, add_stage_args, bytes_across_workers, choose_device_batch_size, data_position,
                                 loop_step, lr_multiplier, muon_momentum, scale_initial_lrs, set_schedule, train_steps)
from scripts.sync_choice import sync_lib
from tasks.mixtures import training_mixture, validation_task

# How each conversation stage trains (its name, source and report section: nanochat/stage.py)
TRAINING = {
    "mid": dict(description="Midtrain a base model on conversation mixtures (DDP or DiLoCo)",
                loader=conversation_stream_loader, init_lr_frac=1.0, eval_every=150,
                device_batch_size=None, examples_per_step=None),  # micro-batch None: 32 on CUDA, 16 elsewhere
    "sft": dict(description="Fine-tune a mid (or base) model on conversations (DDP or DiLoCo)",
                loader=conversation_padded_loader, init_lr_frac=0.02, eval_every=100,
                device_batch_size=4, examples_per_step=32),
}


def parse_args(stage, argv=None):
    s = TRAINING[stage]
    parser = argparse.ArgumentParser(description=s["description"])
    add_stage_args(parser, eval_every=s["eval_every"], device_batch_help=(
        "rows per rank per micro-step, or auto: the largest power of two up to " +
        ("32 on CUDA (16 elsewhere)" if stage == "mid" else str(s["device_batch_size"])) +
        " that fits in memory (default: auto on CUDA, else that value)"))
    parser.add_argument("--source", choices=STAGE_NAMES, default=STAGES[stage].source, help="stage to start from")
    parser.add_argument("--model-tag", default=None, help="tag of the checkpoint to start from (default: latest)")
    parser.add_argument("--step", type=int, default=None, help="step of the checkpoint to start from (default: last)")
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: --model-tag)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs of the mixture)")
    parser.add_argument("--num-epochs", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the model's)")
    parser.add_argument("--examples-per-step", type=int, default=s["examples_per_step"],
                        help="rows per optimizer step, all ranks (default: one micro-step of --device-batch-size on every "
                             "rank; with auto, of the largest it may choose)"
                        if stage == "mid" else "conversations per optimizer step, all ranks")
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--init-lr-frac", type=float, default=s["init_lr_frac"], help="all lrs scaled by this")
    parser.add_argument("--eval-batches", type=int, default=20, help="val batches per eval and rank")
    sync_lib.add_sync_args(parser)
    return parser.parse_args(argv)


def cli(stage):
    """`python -m scripts.mid_train` / `scripts.chat_sft`: a flag or checkpoint that cannot work is one line, exit 1."""
    with usage_errors():
        main(stage)
    exit_now()  # skip native teardown (see nanochat.common.exit_now)


def main(stage, argv=None):
    args = parse_args(stage, argv)
    s = TRAINING[stage]
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
        raise UsageError(f"--examples-per-step {examples_per_step} must be a multiple of the {world_size} ranks")

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
    B, grad_accum_steps = choose_device_batch_size(B, largest_B, rows_per_rank, micro_step, model, optimizers, T, device,
                                                   sync)
    args.device_batch_size = B  # as chosen, for the checkpoint's metadata

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
           f"{examples_per_step} rows of {T} tokens | sync {sync.mode}")
    ckpt_dir = checkpoint_dir(stage, output_tag)
    layout = {"world_size": world_size, "workers": groups.num_workers}  # another layout resumes from the shared state
    start_step, train_seconds, val_bpb = 0, 0.0, float("nan")
    # under --elastic each worker reads its own slot of the conversations (data_position), as base_train does
    data_rank, data_world = data_position(sync_config, rank, world_size)
    loader_state = fresh_loader_state(data_rank, data_world)
    comm.reset_comm_stats()
    if args.resume:
        start_step, meta, extra = restore_training(ckpt_dir, model, optimizers, sync, device, rank, layout)
        if "loader" not in extra:
            raise UsageError(f"--resume: {ckpt_dir} predates world-size-independent data positions: run without --resume")
        loader_state = extra["loader"]
        train_seconds, val_bpb = meta["train_seconds"], meta["val_bpb"]
    sync.join()  # --elastic: meet the peers now, after the restore, so only a newer live peer overwrites it
    start_step = loop_step(start_step, sync)  # a healed worker continues at its peers' step
    # keep the history up to the resume point, or the step an elastic restart joined at
    joined = args.resume or (sync_config.elastic is not None and start_step > 0)
    metrics = MetricsLog(ckpt_dir, wandb_run, master, resumed_at=start_step if joined else None)

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

    state = {"val_bpb": val_bpb, "loader": loader_state, "meta": None, "seconds": train_seconds}

    def save(step):
        stats = comm.global_comm_stats()
        meta = {"model_config": vars(model.config), "user_config": vars(args), "stage": stage, "source": args.source,
                "source_tag": source_meta["model_tag"], "source_step": source_meta["step"], "val_bpb": state["val_bpb"],
                "rows": step * examples_per_step, "train_seconds": state["seconds"], "sync": sync.mode,
                "inner_bytes": stats["inner"]["bytes"], "outer_bytes": stats["outer"]["bytes"],
                "bytes_across_workers": bytes_across_workers(sync, stats), "mixture": used, "missing": missing}
        save_training(ckpt_dir, step, model, optimizers, sync, meta, rank, extra={"loader": state["loader"]},
                      shared={"loader": global_loader_state(state["loader"])}, layout=layout)
        return meta

    def at_checkpoint(step, at):  # on theta_global, every rank
        if at.eval:
            state["val_bpb"] = evaluate()
            print0(f"step {step:05d} | val bpb {state['val_bpb']:.4f}")
            metrics.log({"step": step, "rows": step * examples_per_step, "val_bpb": state["val_bpb"]}, wandb=False)
        if at.save:
            state["meta"] = save(step)

    train_loader = s["loader"](mixture, tokenizer, B, T, device, data_rank, data_world, resume_state=loader_state,
                               data_seed=args.data_seed)

    def next_batch():
        x, y, state["loader"] = next(train_loader)
        return x, y

    def schedule(step):
        lrm = lrm_at(step)
        # mid restarts Muon from an empty momentum buffer at the full pretraining lr, so it warms the momentum up
        # as base does (and nanochat's mid_train); sft starts at 2 % of that lr and nanochat keeps 0.95 there
        set_schedule(optimizers, lrm, muon_momentum(step) if stage == "mid" else None)
        return lrm

    def on_step(step, loss, lrm, dt):
        state["seconds"] += dt
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {loss.item():.4f} | lrm {lrm:.2f} | "
               f"epoch {state['loader']['epoch']} | dt {dt * 1000:.0f} ms")
        metrics.log({"step": step + 1, "loss": loss.item(), "outer_wait_seconds": sync.wait_seconds}, wandb=False)
        wandb_run.log({"step": step + 1, "loss": loss.item(), "lrm": lrm})

    step, at = train_steps(sync, start_step, num_iterations, grad_accum_steps, micro_step, next_batch, schedule,
                           device_type=device_type, resumed=args.resume, stop_after=args.stop_after,
                           eval_every=args.eval_every, save_every=args.save_every, at_checkpoint=at_checkpoint,
                           on_step=on_step)
    if not at.last:
        print0(f"stopped after step {step}: continue with --resume")
        compute_cleanup()
        return
    get_report().log(section=STAGES[stage].section, data=[
        {"source": f"{args.source}/{source_meta['model_tag']} step {source_meta['step']}", "sync": sync.mode,
         **({"diloco_h": args.diloco_h, "workers": groups.num_workers} if sync.mode == "diloco" else {})},
        {name: n for name, n in used}, {"missing offline": ", ".join(missing) or "none"},
        {"steps": num_iterations, "rows": num_iterations * examples_per_step, "val_bpb": state["val_bpb"],
         "train_seconds": state["seconds"], "outer_wait_seconds": sync.wait_seconds,
         "bytes_across_workers": state["meta"]["bytes_across_workers"]},
    ])
    peak = f", peak memory allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if device_type == "cuda" else ""
    print0(f"done: val bpb {state['val_bpb']:.4f}, {state['seconds']:.1f} s{peak}, checkpoint {ckpt_dir}")
    wandb_run.finish()
    compute_cleanup()
