"""Pretrain the base model, with DDP or DiLoCo synchronisation.

    python -m scripts.base_train                                   # one process (CPU: the tiny preset)
    torchrun --nproc_per_node=2 -m scripts.base_train              # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --preset d20 --sync diloco --diloco-h 100
"""

import argparse
import math

from nanochat import comm
from nanochat.common import UsageError, autodetect_device_type, exit_now, peak_flops, print0, usage_errors
from nanochat.dataloader import PACKINGS, ROW_POOLS, tokenizing_distributed_data_loader
from nanochat.gpt import config_from_depth, gpt_on_meta
from nanochat.loss_eval import evaluate_bpb
from nanochat.runner import StageRun
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train_loop import add_stage_args, lr_multiplier, muon_momentum, set_schedule
from scripts import flags
from scripts.sync_choice import sync_lib, sync_summary

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
    if args.device_batch_size is None and device_type == "cuda":
        args.device_batch_size = "auto"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sync_config = flags.sync_config(args)
    run = StageRun("base", flags.run_config(args), sync_lib, sync_config, vars(args), "nanochat-diloco")

    # Tokenizer and model
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=run.device)
    vocab_size = tokenizer.get_vocab_size()
    model_config = config_from_depth(args.depth, vocab_size, args.max_seq_len, aspect_ratio=args.aspect_ratio,
                                     head_dim=args.head_dim)
    model_config.value_embeds = bool(args.value_embeds)
    model = gpt_on_meta(model_config)
    model.to_empty(device=run.device)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"preset {preset} | {model_config} | {num_params:,} parameters | {flops_per_token:.3e} FLOPs/token")

    # Synchronisation (the DiLoCo seam), inner optimizers over the gradient-averaging group
    train_model = run.setup(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                            matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                            muon_weight_decay=args.muon_weight_decay)
    if args.sync == "diloco":
        print0(f"DiLoCo: {run.groups.num_workers} workers x {run.groups.ranks_per_worker} ranks, H={args.diloco_h}, "
               f"outer lr {args.outer_lr}, momentum {args.outer_momentum}, nesterov {args.outer_nesterov}, "
               f"compression {args.outer_compression}")

    def micro_step(x, y):
        with run.autocast:
            return train_model(x, y)

    # Horizon and batch: the micro-batch divides the rows each rank takes per step, so accumulation keeps the total
    if args.total_batch_size % (args.max_seq_len * run.world_size):
        raise UsageError(f"--total-batch-size {args.total_batch_size} must be a multiple of --max-seq-len x ranks "
                         f"({args.max_seq_len * run.world_size})")
    rows_per_rank = args.total_batch_size // (args.max_seq_len * run.world_size)
    args.device_batch_size, grad_accum_steps = run.device_batch(
        args.device_batch_size, PRESETS[preset]["device_batch_size"], rows_per_rank, micro_step, args.max_seq_len)
    num_iterations = args.num_iterations
    if num_iterations < 0:
        num_iterations = round(args.target_param_data_ratio * num_params / args.total_batch_size)
    print0(f"{num_iterations} steps x {args.total_batch_size:,} tokens = {num_iterations * args.total_batch_size:,} "
           f"tokens ({grad_accum_steps} micro-steps of {args.device_batch_size}x{args.max_seq_len} per rank per step)")

    meta = run.start(args.model_tag or f"d{args.depth}", num_iterations, unit="tokens", per_step=args.total_batch_size)
    saved_packing = meta and meta["user_config"].get("packing", "stream")  # checkpoints before --packing streamed
    if meta and saved_packing != args.packing:  # a data position counts rows or tokens: meaningless in the other packing
        raise UsageError(f"{run.ckpt_dir} was trained with --packing {saved_packing}: resume with --packing {saved_packing}")
    train_loader = tokenizing_distributed_data_loader(args.device_batch_size, args.max_seq_len, "train", tokenizer,
                                                      run.device, rank=run.data_rank, world_size=run.data_world,
                                                      resume_state=run.loader_state, data_seed=args.data_seed,
                                                      packing=args.packing, pools=args.packing_pools)

    def evaluate():
        model.eval()
        val_loader = tokenizing_distributed_data_loader(args.device_batch_size, args.max_seq_len, "val", tokenizer,
                                                        run.device)
        steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * run.world_size))
        with run.autocast:
            bpb = evaluate_bpb(model, val_loader, steps, token_bytes)
        model.train()
        return bpb

    def sample():
        prompts = ["The capital of France is", "The chemical symbol of gold is",
                   "If yesterday was Friday, then tomorrow will be", "My favorite color is", "def fibonacci(n):"]
        model.eval()
        for prompt in prompts:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with run.autocast:
                out = list(model.generate(ids, max_tokens=16, temperature=0))
            print0(f"  sample: {tokenizer.decode(ids[1:] + out)!r}")
        model.train()

    def schedule(step):
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(run.optimizers, lrm, muon_momentum(step),
                     wd_frac=0.5 * (1 + math.cos(math.pi * step / num_iterations)))
        return lrm

    peak, smooth = peak_flops(run.device), {"loss": 0.0}

    def progress(step, loss, lrm, dt, opt_dt):
        smooth["loss"] = 0.9 * smooth["loss"] + 0.1 * loss
        debiased = smooth["loss"] / (1 - 0.9 ** (step - run.start_step + 1))
        tok_per_s = args.total_batch_size / dt
        mfu = f"{100 * flops_per_token * tok_per_s / (peak * run.world_size):.1f}%" if peak else "-"
        stats = comm.comm_stats()
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f} ms | "
               f"opt {opt_dt * 1000:.0f} ms | tok/s {tok_per_s:,.0f} | mfu {mfu} | "
               f"inner {stats.get('inner', {}).get('bytes', 0):,} B | "
               f"outer {stats.get('outer', {}).get('bytes', 0):,} B (this rank)")
        return {"tok_per_s": tok_per_s}

    step, at = run.train(train_loader, micro_step, grad_accum_steps, schedule, evaluate, progress, sample=sample,
                         stage_meta=lambda step: {"preset": preset})
    run.finish(step, at, [{"preset": preset, "depth": args.depth, "parameters": num_params, "vocab": vocab_size,
                           "ranks": run.world_size, "device_batch_size": args.device_batch_size,
                           **sync_summary(args, run.groups)}])


if __name__ == "__main__":
    with usage_errors():  # a flag or checkpoint that cannot work: one line, exit 1
        main()
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
