"""The two conversation-training stages, with DDP or DiLoCo synchronisation:

  mid  (scripts/mid_train.py): from a base model; conversations packed into a token stream and every token
       trained, like pretraining, so the model picks up the chat format, tool calls and multiple choice.
  sft  (scripts/chat_sft.py): from a mid model; whole conversations, padded, loss on the assistant's tokens
       only; the learning rate starts low and decays linearly to zero.

Both continue from a checkpoint of either sync mode and save their own checkpoint and report section.
"""

import argparse

from nanochat.checkpoint import load_model
from nanochat.common import UsageError, exit_now, print0, usage_errors
from nanochat.dataloader import conversation_padded_loader, conversation_stream_loader, count_conversation_tokens
from nanochat.loss_eval import evaluate_bpb
from nanochat.runner import StageRun
from nanochat.stage import STAGE_NAMES, STAGES
from nanochat.tokenizer import get_token_bytes
from nanochat.train_loop import add_stage_args, lr_multiplier, muon_momentum, set_schedule
from scripts import flags
from scripts.sync_choice import sync_lib, sync_summary
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
    sync_config = flags.sync_config(args)
    run = StageRun(stage, flags.run_config(args), sync_lib, sync_config, vars(args), f"nanochat-diloco-{stage}")

    model, tokenizer, source_meta = load_model(args.source, run.device, phase="train", model_tag=args.model_tag,
                                               step=args.step)
    token_bytes = get_token_bytes(device=run.device)
    T = args.max_seq_len or model.config.sequence_len
    largest_B = s["device_batch_size"] or (32 if run.device_type == "cuda" else 16)
    B = args.device_batch_size or ("auto" if run.device_type == "cuda" else largest_B)
    examples_per_step = args.examples_per_step or (largest_B if B == "auto" else B) * run.world_size
    if examples_per_step % run.world_size:
        raise UsageError(f"--examples-per-step {examples_per_step} must be a multiple of the {run.world_size} ranks")
    train_model = run.setup(model, init_lr_frac=args.init_lr_frac, unembedding_lr=args.unembedding_lr,
                            embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr)

    targets = {}  # of the last micro-batch: an sft batch whose rows all end before their answers has none

    def micro_step(x, y):
        targets["tokens"] = (y >= 0).sum()
        with run.autocast:  # mean over the batch's targets; a batch without any has loss 0 and no gradient
            return train_model(x, y, loss_reduction="none").sum() / targets["tokens"].clamp(min=1)

    rows_per_rank = examples_per_step // run.world_size  # the micro-batch divides it: accumulation keeps the total
    B, grad_accum_steps = run.device_batch(B, largest_B, rows_per_rank, micro_step, T)
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
    print0(f"{stage} from {args.source}/{source_meta['model_tag']} step {source_meta['step']} | {num_iterations} steps x "
           f"{examples_per_step} rows of {T} tokens | sync {args.sync}")
    run.start(args.output_tag or source_meta["model_tag"], num_iterations, unit="rows", per_step=examples_per_step)
    train_loader = s["loader"](mixture, tokenizer, B, T, run.device, run.data_rank, run.data_world,
                               resume_state=run.loader_state, data_seed=args.data_seed)

    def evaluate():
        """bits per byte of the held-out conversations' target tokens (sft: the assistant's only)"""
        model.eval()
        val_loader = s["loader"](val_task, tokenizer, B, T, run.device, run.rank, run.world_size)
        with run.autocast:
            bpb = evaluate_bpb(model, val_loader, args.eval_batches, token_bytes)
        model.train()
        return bpb

    def schedule(step):  # sft: a linear decay to zero; mid: constant, then the last 20 % decays to zero
        lrm = 1.0 - step / num_iterations if stage == "sft" else lr_multiplier(step, num_iterations, 0.0, 0.2, 0.0)
        # mid restarts Muon from an empty momentum buffer at the full pretraining lr, so it warms the momentum up
        # as base does (and nanochat's mid_train); sft starts at 2 % of that lr and nanochat keeps 0.95 there
        set_schedule(run.optimizers, lrm, muon_momentum(step) if stage == "mid" else None)
        return lrm

    def progress(step, loss, lrm, dt, opt_dt):
        n = targets["tokens"].item()  # a loss of 0 then means no target, not a perfect prediction: say which
        shown = f"{loss:.4f}" if n else f"- (no target tokens: the rows end before their answers at {T} tokens)"
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {shown} | lrm {lrm:.2f} | "
               f"epoch {run.loader_state['epoch']} | dt {dt * 1000:.0f} ms | opt {opt_dt * 1000:.0f} ms")
        return {"target_tokens": n}

    source = {"source": args.source, "source_tag": source_meta["model_tag"], "source_step": source_meta["step"]}
    step, at = run.train(train_loader, micro_step, grad_accum_steps, schedule, evaluate, progress,
                         stage_meta=lambda step: {**source, "mixture": used, "missing": missing})
    run.finish(step, at, [{"source": f"{args.source}/{source_meta['model_tag']} step {source_meta['step']}",
                           **sync_summary(args, run.groups)},
                          {name: n for name, n in used}, {"missing offline": ", ".join(missing) or "none"}])
