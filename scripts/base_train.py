"""Pretrain the base model, with DDP or DiLoCo synchronisation.

    python -m scripts.base_train                                   # one process (CPU: the tiny preset)
    torchrun --nproc_per_node=2 -m scripts.base_train              # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --preset d20 --sync diloco --diloco-h 100
"""

import argparse
import math

import torch

from nanochat import comm
from nanochat.checkpoint import checkpoint_dir, restore_training, save_training
from nanochat.common import (UsageError, autocast_context, autodetect_device_type, compute_cleanup, compute_init,
                             exit_now, init_wandb, peak_flops, print0, usage_errors)
from nanochat.dataloader import PACKINGS, ROW_POOLS, fresh_loader_state, global_loader_state, tokenizing_distributed_data_loader
from nanochat.gpt import config_from_depth, gpt_on_meta
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import explain_out_of_memory
from nanochat.report import get_report
from nanochat.stage import STAGES
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train_loop import (MetricsLog, add_stage_args, bytes_across_workers, choose_device_batch_size, data_position,
                                 loop_step, lr_multiplier, muon_momentum, set_schedule, train_steps)
from scripts.sync_choice import sync_lib

# Presets: "tiny" learns visibly in minutes on 2 CPU cores; "d20" is nanochat's 8xH100 speedrun model.
PRESETS = {
    "tiny": dict(depth=2, aspect_ratio=64, head_dim=64, max_seq_len=256, device_batch_size=16,
                 total_batch_size=8192, num_iterations=600, eval_every=100, eval_tokens=65536,
                 sample_every=300, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004),
    "d20": dict(depth=20, aspect_ratio=64, head_dim=128, max_seq_len=2048, device_batch_size=32,
                total_batch_size=524288, num_iterations=-1, eval_every=250, eval_tokens=20 * 524288,
                sample_every=2000, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the base model (DDP or DiLoCo)")
    add_stage_args(parser, device_batch_help="sequences per rank per micro-step, or auto: the largest power of two up "
                   "to the preset's that fits in memory (default: auto on CUDA, the preset's elsewhere)")
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="auto: d20 on CUDA, tiny elsewhere")
    parser.add_argument("--model-tag", default="", help="checkpoint folder name (default: d<depth>)")
    parser.add_argument("--packing", choices=PACKINGS, default="rows",
                        help="rows: each step's rows drawn from a whole row group of documents (learns more per token); "
                             "stream: consecutive tokens (this project's packing before 2026-12-07)")
    parser.add_argument("--packing-pools", type=int, default=ROW_POOLS,
                        help="--packing rows: row groups each rank draws a step's rows from at once")
    # model
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--aspect-ratio", type=int, default=None, help="model width = depth * aspect ratio")
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--value-embeds", type=int, choices=[0, 1], default=0,
                        help="value embeddings: -0.017 bpb per token at the tiny preset but 11 %% fewer tokens/s, a loss "
                             "at equal time; one vocab x kv-width table per other layer (memory, bytes per DiLoCo sync)")
    parser.add_argument("--max-seq-len", type=int, default=None)
    # horizon
    parser.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step, all ranks")
    parser.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (-1: from --target-param-data-ratio)")
    parser.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla)")
    # optimisation
    parser.add_argument("--matrix-lr", type=float, default=None, help="Muon lr")
    parser.add_argument("--embedding-lr", type=float, default=None, help="AdamW lr of the embedding")
    parser.add_argument("--unembedding-lr", type=float, default=None, help="AdamW lr of the lm_head")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's (lm_head, embeddings)")
    parser.add_argument("--muon-weight-decay", type=float, default=0.28,
                        help="Muon's cautious weight decay, falling to zero over training as a cosine (0: off)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--warmdown-ratio", type=float, default=0.2)
    parser.add_argument("--final-lr-frac", type=float, default=0.0)
    # evaluation and sampling (the preset's when not given)
    parser.add_argument("--eval-tokens", type=int, default=None, help="val tokens per eval")
    parser.add_argument("--sample-every", type=int, default=None, help="steps between samples (0: only at the end)")
    sync_lib.add_sync_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    preset = args.preset if args.preset != "auto" else ("d20" if device_type == "cuda" else "tiny")
    explain_out_of_memory()  # from here on an OOM ends the run with one line saying what to try
    if args.device_batch_size is None and device_type == "cuda":
        args.device_batch_size = "auto"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed,
                                                             timeout_s=args.collective_timeout)
    master = rank == 0
    autocast = autocast_context(device_type)
    wandb_run = init_wandb(args.run, "nanochat-diloco", vars(args), master)

    # Tokenizer and model
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    model_config = config_from_depth(args.depth, vocab_size, args.max_seq_len, aspect_ratio=args.aspect_ratio,
                                     head_dim=args.head_dim)
    model_config.value_embeds = bool(args.value_embeds)
    model = gpt_on_meta(model_config)
    model.to_empty(device=device)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"preset {preset} | {model_config} | {num_params:,} parameters | {flops_per_token:.3e} FLOPs/token")

    # Synchronisation (the DiLoCo seam), inner optimizers over the gradient-averaging group
    sync_config = sync_lib.sync_config_from_args(args)
    groups = sync_lib.make_worker_groups(sync_config)
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                        muon_weight_decay=args.muon_weight_decay, process_group=groups.inner)
    sync = sync_lib.make_sync(sync_config, model, optimizers, groups)
    if args.sync == "diloco":
        print0(f"DiLoCo: {groups.num_workers} workers x {groups.ranks_per_worker} ranks, H={args.diloco_h}, "
               f"outer lr {args.outer_lr}, momentum {args.outer_momentum}, nesterov {args.outer_nesterov}, "
               f"compression {args.outer_compression}")
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    def micro_step(x, y):
        with autocast:
            return train_model(x, y)

    # Horizon and batch: the micro-batch divides the rows each rank takes per step, so accumulation keeps the total
    if args.total_batch_size % (args.max_seq_len * world_size):
        raise UsageError(f"--total-batch-size {args.total_batch_size} must be a multiple of --max-seq-len x ranks "
                         f"({args.max_seq_len * world_size})")
    rows_per_rank = args.total_batch_size // (args.max_seq_len * world_size)
    args.device_batch_size, grad_accum_steps = choose_device_batch_size(
        args.device_batch_size, PRESETS[preset]["device_batch_size"], rows_per_rank, micro_step, model, optimizers,
        args.max_seq_len, device, sync)
    num_iterations = args.num_iterations
    if num_iterations < 0:
        num_iterations = round(args.target_param_data_ratio * num_params / args.total_batch_size)
    sync.set_total_steps(num_iterations)  # the outer schedule may end differently
    print0(f"{num_iterations} steps x {args.total_batch_size:,} tokens = {num_iterations * args.total_batch_size:,} "
           f"tokens ({grad_accum_steps} micro-steps of {args.device_batch_size}x{args.max_seq_len} per rank per step)")

    # Resume
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", model_tag)
    layout = {"world_size": world_size, "workers": groups.num_workers}  # another layout resumes from the shared state
    start_step, loader_state, train_seconds = 0, fresh_loader_state(rank, world_size), 0.0
    val_bpb = min_val_bpb = float("nan")
    if args.resume:
        start_step, meta, extra = restore_training(ckpt_dir, model, optimizers, sync, device, rank, layout)
        loader_state, train_seconds = extra["loader"], meta["train_seconds"]
        saved_packing = meta["user_config"].get("packing", "stream")  # checkpoints before --packing streamed
        if saved_packing != args.packing:  # a data position counts rows or tokens: it means nothing in the other packing
            raise UsageError(f"{ckpt_dir} was trained with --packing {saved_packing}: resume with --packing {saved_packing}")
        val_bpb, min_val_bpb = meta["val_bpb"], meta["min_val_bpb"]
    sync.join()  # --elastic: meet the peers now, after the restore, so only a newer live peer overwrites it
    start_step = loop_step(start_step, sync)  # a healed worker continues at its peers' step
    # the loader's rank and world: under --elastic each worker reads its own slot of the data, whoever else is up
    data_rank, data_world = data_position(sync_config, rank, world_size)
    if sync_config.elastic is not None and not args.resume:
        loader_state = fresh_loader_state(data_rank, data_world)
    train_loader = tokenizing_distributed_data_loader(args.device_batch_size, args.max_seq_len, "train", tokenizer,
                                                      device, rank=data_rank, world_size=data_world,
                                                      resume_state=loader_state, data_seed=args.data_seed,
                                                      packing=args.packing, pools=args.packing_pools)
    position = {"loader": loader_state}  # the data position after the last batch trained on (saved with a checkpoint)

    def next_batch():
        x, y, position["loader"] = next(train_loader)
        return x, y

    def evaluate():
        model.eval()
        val_loader = tokenizing_distributed_data_loader(args.device_batch_size, args.max_seq_len, "val", tokenizer, device)
        steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
        with autocast:
            bpb = evaluate_bpb(model, val_loader, steps, token_bytes)
        model.train()
        return bpb

    def sample():
        prompts = ["The capital of France is", "The chemical symbol of gold is",
                   "If yesterday was Friday, then tomorrow will be", "My favorite color is", "def fibonacci(n):"]
        model.eval()
        for prompt in prompts:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                out = list(model.generate(ids, max_tokens=16, temperature=0))
            print0(f"  sample: {tokenizer.decode(ids[1:] + out)!r}")
        model.train()

    # keep the history up to the resume point, or the step an elastic restart joined at
    joined = args.resume or (sync_config.elastic is not None and start_step > 0)
    metrics = MetricsLog(ckpt_dir, wandb_run, master, resumed_at=start_step if joined else None)

    def comm_figures(stats=None):
        stats = stats or comm.global_comm_stats()
        return {f"{label}_bytes": stats[label]["bytes"] for label in ("inner", "outer")}

    state = {"val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "smooth_loss": 0.0, "seconds": train_seconds}

    def at_checkpoint(step, at):  # on theta_global, every rank; rank 0 samples and writes
        tokens_seen = step * args.total_batch_size
        if at.eval:
            state["val_bpb"] = evaluate()
            state["min_val_bpb"] = state["val_bpb"] if math.isnan(state["min_val_bpb"]) else min(state["min_val_bpb"],
                                                                                                 state["val_bpb"])
            figures = comm_figures()
            print0(f"step {step:05d} | val bpb {state['val_bpb']:.4f} | tokens {tokens_seen:,} | "
                   f"inner {figures['inner_bytes']:,} B | outer {figures['outer_bytes']:,} B")
            metrics.log({"step": step, "tokens": tokens_seen, "val_bpb": state["val_bpb"],
                         "train_seconds": state["seconds"], **figures})
        if at.sample and master:
            sample()
        if at.save:
            meta = {"model_config": vars(model_config), "user_config": vars(args), "stage": "base", "preset": preset,
                    "val_bpb": state["val_bpb"], "min_val_bpb": state["min_val_bpb"], "tokens": tokens_seen,
                    "train_seconds": state["seconds"], "num_iterations": num_iterations,
                    "world_size": world_size, "sync": sync.mode, **comm_figures()}
            save_training(ckpt_dir, step, model, optimizers, sync, meta, rank, extra={"loader": position["loader"]},
                          shared={"loader": global_loader_state(position["loader"])}, layout=layout)

    peak = peak_flops(device)

    def schedule(step):
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(optimizers, lrm, muon_momentum(step), wd_frac=0.5 * (1 + math.cos(math.pi * step / num_iterations)))
        return lrm

    def on_step(step, loss, lrm, dt):
        state["seconds"] += dt
        loss_value = loss.item()  # this rank's last micro-batch loss: no extra communication just to log
        state["smooth_loss"] = 0.9 * state["smooth_loss"] + 0.1 * loss_value
        debiased = state["smooth_loss"] / (1 - 0.9 ** (step - start_step + 1))
        tok_per_s = args.total_batch_size / dt
        mfu = f"{100 * flops_per_token * tok_per_s / (peak * world_size):.1f}%" if peak else "-"
        stats = comm.comm_stats()
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f} ms | "
               f"tok/s {tok_per_s:,.0f} | mfu {mfu} | inner {stats.get('inner', {}).get('bytes', 0):,} B | "
               f"outer {stats.get('outer', {}).get('bytes', 0):,} B (this rank)")
        metrics.log({"step": step + 1, "loss": loss_value, "lrm": lrm, "dt": dt, "tok_per_s": tok_per_s,
                     "outer_wait_seconds": sync.wait_seconds})

    step, at = train_steps(sync, start_step, num_iterations, grad_accum_steps, micro_step, next_batch, schedule,
                           device_type=device_type, resumed=args.resume, stop_after=args.stop_after,
                           eval_every=args.eval_every, sample_every=args.sample_every, save_every=args.save_every,
                           at_checkpoint=at_checkpoint, on_step=on_step)
    train_seconds = state["seconds"]

    # Summary
    stats = comm.global_comm_stats()
    figures = comm_figures(stats)
    tokens_total = step * args.total_batch_size
    val_bpb, min_val_bpb = state["val_bpb"], state["min_val_bpb"]
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None  # this rank's
    print0(f"done: {step} steps, {tokens_total:,} tokens, val bpb {val_bpb:.4f}, {train_seconds:.1f} s training" +
           (f", peak memory allocated {peak_mib:,.0f} MiB" if peak_mib is not None else ""))
    if at.last:
        bytes_across = bytes_across_workers(sync, stats)
        get_report().log(section=STAGES["base"].section, data=[
            {"preset": preset, "depth": args.depth, "parameters": num_params, "vocab": vocab_size, "ranks": world_size,
             "device_batch_size": args.device_batch_size, "sync": sync.mode,
             **({"diloco_h": args.diloco_h, "workers": groups.num_workers, "outer_lr": args.outer_lr,
                 "outer_momentum": args.outer_momentum, "compression": args.outer_compression}
                if sync.mode == "diloco" else {})},
            {"steps": num_iterations, "tokens": tokens_total, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb,
             "train_seconds": train_seconds, "outer_wait_seconds": sync.wait_seconds,
             "tokens_per_second": tokens_total / max(train_seconds, 1e-9),
             "inner_bytes": figures["inner_bytes"], "outer_bytes": figures["outer_bytes"],
             "bytes_across_workers": bytes_across, "bytes_across_workers_per_token": bytes_across / max(tokens_total, 1),
             **({"peak_memory_allocated_mib": round(peak_mib)} if peak_mib is not None else {})},
        ])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    with usage_errors():  # a flag or checkpoint that cannot work: one line, exit 1
        main()
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
