"""A training stage's run, written once for the stages that read a token loader (base, mid, sft): the process
and its sync, resume or a fresh start, the data position, evals, saves, the metrics log, train seconds and the
report with the bytes that crossed between workers (asked of the sync object). A stage's script declares only its
own: flags, model, loader, loss, evaluation, schedule and progress line.

    run = StageRun("mid", run_config, sync_lib, sync_config, vars(args), "wandb-project")  # scripts/flags.py
    model = ...                                               # the stage's: built from scratch or loaded
    train_model = run.setup(model, init_lr_frac=0.02, matrix_lr=...)  # worker groups, optimizers, sync, compile
    B, grad_accum_steps = run.device_batch(B, largest_B, rows_per_rank, micro_step, seq_len)
    run.start(tag, num_steps, unit="rows", per_step=rows)     # --resume, or step 0 (an elastic joiner: its peers')
    loader = ...(rank=run.data_rank, world_size=run.data_world, resume_state=run.loader_state)
    step, at = run.train(loader, micro_step, grad_accum_steps, schedule, evaluate, progress, stage_meta=...)
    run.finish(step, at, [config_row, ...])

sync_lib is whichever of diloco/ or nanochat/sync.py the script picked (scripts/sync_choice.py): nanochat never
imports diloco. The loop itself is train_loop.train_steps. chat_rl, whose data are its own rollouts, takes the
process and sync from StageRun and the loop from train_steps, and checkpoints its loop state (history, reward
window) instead of a data position.
"""

import math
from dataclasses import dataclass

import torch

from nanochat import comm
from nanochat.checkpoint import checkpoint_dir, restore_training, save_training
from nanochat.common import (UsageError, autocast_context, autodetect_device_type, compute_cleanup, compute_init,
                             init_wandb, print0)
from nanochat.dataloader import fresh_loader_state, global_loader_state
from nanochat.memory import explain_out_of_memory
from nanochat.optim import Muon
from nanochat.report import get_report
from nanochat.stage import check_stage
from nanochat.train_loop import (MetricsLog, bytes_across_workers, choose_device_batch_size, data_position,
                                 loop_step, scale_initial_lrs, train_steps)


@dataclass
class RunConfig:
    """The flags every training stage has (train_loop.add_stage_args), as the runner reads them.

    Args:
        device_type: cuda|cpu|mps, "" to autodetect.
        run: wandb run name ("" for none).
        resume: continue from the stage's last checkpoint of its tag.
        stop_after: save and stop after this step (-1: run to the end).
        eval_every, sample_every, save_every: steps between them (0: only at the end).
        compile: torch.compile 1/0, -1 on CUDA only.
    """
    device_type: str = ""
    run: str = ""
    seed: int = 1337
    resume: bool = False
    stop_after: int = -1
    eval_every: int = 0
    sample_every: int = 0
    save_every: int = 0
    compile: int = -1


def comm_figures(stats=None):
    """Bytes sent per label, summed over ranks (collective when stats is not given)."""
    stats = stats or comm.global_comm_stats()
    return {f"{label}_bytes": stats[label]["bytes"] for label in ("inner", "outer")}


class StageRun:
    """One stage's run (module docstring). Attributes the script reads: device_type, device, rank, world_size,
    master, autocast, wandb_run, groups, optimizers, sync, start_step, num_steps, data_rank, data_world,
    loader_state (the data position after the last batch trained on, saved with each checkpoint), seconds,
    val_bpb, ckpt_dir."""

    def __init__(self, stage, config, sync_lib, sync_config, user_config, wandb_project):
        self.stage, self.config, self.sync_lib, self.sync_config = check_stage(stage), config, sync_lib, sync_config
        self.user_config = user_config  # recorded in every checkpoint (a live dict: what the run resolved is in it)
        self.device_type = config.device_type or autodetect_device_type()
        explain_out_of_memory()  # from here on an OOM ends the run with one line saying what to try
        _, self.rank, _, self.world_size, self.device = compute_init(self.device_type, seed=config.seed,
                                                                     timeout_s=sync_config.collective_timeout)
        self.master = self.rank == 0
        self.autocast = autocast_context(self.device_type)
        self.wandb_run = init_wandb(config.run, wandb_project, user_config, self.master)
        comm.reset_comm_stats()  # the run's bytes count from here (a second run in one process starts from zero)
        self.seconds, self.val_bpb, self.min_val_bpb = 0.0, float("nan"), float("nan")

    def setup(self, model, init_lr_frac=None, **optimizer_kwargs):
        """Worker groups, the inner optimizers over the gradient-averaging group (lrs scaled by init_lr_frac), the
        sync object (which broadcasts rank 0's weights); -> the model to train (compiled on CUDA)."""
        self.model = model
        self.groups = self.sync_lib.make_worker_groups(self.sync_config)
        self.optimizers = model.setup_optimizers(**optimizer_kwargs, process_group=self.groups.inner)
        if init_lr_frac is not None:
            scale_initial_lrs(self.optimizers, init_lr_frac)
        self.sync = self.sync_lib.make_sync(self.sync_config, model, self.optimizers, self.groups)
        use_compile = self.config.compile == 1 or (self.config.compile == -1 and self.device_type == "cuda")
        for opt in self.optimizers:
            if isinstance(opt, Muon):
                opt.compile = use_compile  # its per-shape-group step, with the model
        return torch.compile(model, dynamic=False) if use_compile else model

    def device_batch(self, batch_size, largest, rows_per_rank, micro_step, seq_len):
        """train_loop.choose_device_batch_size for this run: -> (micro-batch, micro-steps per optimizer step)."""
        return choose_device_batch_size(batch_size, largest, rows_per_rank, micro_step, self.model, self.optimizers,
                                        seq_len, self.device, self.sync)

    def start(self, tag, num_steps, unit, per_step):
        """Resume from the stage's last checkpoint of `tag` (--resume) or start fresh, then (--elastic) meet the peers:
        a worker behind a live peer is healed and continues at its step, reading its own slot of the data. `unit` names what a step trains on ("tokens",
        "rows"), per_step how many over all ranks. -> the resumed checkpoint's meta, or None."""
        self.num_steps, self.unit, self.per_step = num_steps, unit, per_step
        self.sync.set_total_steps(num_steps)  # the outer schedule may end differently
        self.ckpt_dir = checkpoint_dir(self.stage.name, tag)
        self.layout = {"world_size": self.world_size, "workers": self.groups.num_workers}  # another layout resumes
        self.data_rank, self.data_world = data_position(self.sync_config, self.rank, self.world_size)
        self.start_step, self.loader_state, meta = 0, fresh_loader_state(self.data_rank, self.data_world), None
        if self.config.resume:
            self.start_step, meta, extra = restore_training(self.ckpt_dir, self.model, self.optimizers, self.sync,
                                                            self.device, self.rank, self.layout)
            if "loader" not in extra:
                raise UsageError(f"--resume: {self.ckpt_dir} predates world-size-independent data positions: run "
                                 f"without --resume")
            self.loader_state, self.seconds, self.val_bpb = extra["loader"], meta["train_seconds"], meta["val_bpb"]
            self.min_val_bpb = meta.get("min_val_bpb", float("nan"))
        self.sync.join()  # --elastic: meet the peers now, after the restore, so only a newer live peer overwrites it
        self.start_step = loop_step(self.start_step, self.sync)  # a healed worker continues at its peers' step
        # keep the history up to the resume point, or the step an elastic restart joined at
        joined = self.config.resume or (self.sync_config.elastic is not None and self.start_step > 0)
        self.metrics = MetricsLog(self.ckpt_dir, self.wandb_run, self.master,
                                  resumed_at=self.start_step if joined else None)
        return meta

    def train(self, loader, micro_step, grad_accum_steps, schedule, evaluate, progress, sample=None, stage_meta=None):
        """train_loop.train_steps over `loader` (yields x, y, its state after the batch). evaluate() -> val bpb, on
        theta_global, every rank; sample() on rank 0; stage_meta(step) -> the stage's own checkpoint metadata;
        progress(step, loss, lrm, dt, opt_dt) prints the step's line (opt_dt: sync.step()'s seconds) and returns
        extra fields for its metrics record.
        -> (the last step reached, its plan)."""

        def next_batch():
            x, y, self.loader_state = next(loader)
            return x, y

        def at_checkpoint(step, at):  # on theta_global, every rank
            if at.eval:
                self.val_bpb = evaluate()
                self.min_val_bpb = self.val_bpb if math.isnan(self.min_val_bpb) else min(self.min_val_bpb, self.val_bpb)
                stats = comm.global_comm_stats()
                figures = comm_figures(stats)
                print0(f"step {step:05d} | val bpb {self.val_bpb:.4f} | {self.unit} {step * self.per_step:,} | "
                       f"inner {figures['inner_bytes']:,} B | outer {figures['outer_bytes']:,} B")
                self.metrics.log({"step": step, self.unit: step * self.per_step, "val_bpb": self.val_bpb,
                                  "train_seconds": self.seconds, **figures,
                                  "bytes_across_workers": bytes_across_workers(self.sync, stats)})
            if at.sample and self.master and sample is not None:
                sample()
            if at.save:
                self.save(step, stage_meta(step) if stage_meta else {})

        def on_step(step, loss, lrm, dt, opt_dt):
            self.seconds += dt
            loss_value = loss.item()  # this rank's last micro-batch loss: no extra communication just to log
            extra = progress(step, loss_value, lrm, dt, opt_dt) or {}
            self.metrics.log({"step": step + 1, "loss": loss_value, "lrm": lrm, "dt": dt, "opt_seconds": opt_dt,
                              **extra,
                              "outer_wait_seconds": self.sync.wait_seconds})

        return train_steps(self.sync, self.start_step, self.num_steps, grad_accum_steps, micro_step, next_batch,
                           schedule, device_type=self.device_type, resumed=self.config.resume,
                           stop_after=self.config.stop_after, eval_every=self.config.eval_every,
                           sample_every=self.config.sample_every, save_every=self.config.save_every,
                           at_checkpoint=at_checkpoint, on_step=on_step)

    def save(self, step, stage_meta):
        """A checkpoint (collective, inside sync.global_view()): the stage's metadata plus the run's, the data
        position per rank and merged over ranks (so another layout can resume)."""
        stats = comm.global_comm_stats()
        meta = {"model_config": vars(self.model.config), "user_config": self.user_config, "stage": self.stage.name,
                **stage_meta, "val_bpb": self.val_bpb, "min_val_bpb": self.min_val_bpb,
                self.unit: step * self.per_step, "train_seconds": self.seconds, "num_iterations": self.num_steps,
                "world_size": self.world_size, "sync": self.sync.mode, **comm_figures(stats),
                "bytes_across_workers": bytes_across_workers(self.sync, stats)}
        save_training(self.ckpt_dir, step, self.model, self.optimizers, self.sync, meta, self.rank,
                      extra={"loader": self.loader_state}, shared={"loader": global_loader_state(self.loader_state)},
                      layout=self.layout)

    def finish(self, step, at, report_rows):
        """After the loop: a stopped run says how to continue; a finished one writes its report section (the
        stage's rows, then the run's figures) and a last line. Ends wandb and the process group."""
        if not at.last:
            print0(f"stopped after step {step}: continue with --resume")
        else:
            stats = comm.global_comm_stats()  # collective: every rank
            across, total = bytes_across_workers(self.sync, stats), step * self.per_step
            peak_mib = torch.cuda.max_memory_allocated() / 2**20 if self.device_type == "cuda" else None  # this rank's
            get_report().log(section=self.stage.section, data=[*report_rows, {
                "steps": self.num_steps, self.unit: total, "val_bpb": self.val_bpb, "min_val_bpb": self.min_val_bpb,
                "train_seconds": self.seconds, "outer_wait_seconds": self.sync.wait_seconds,
                f"{self.unit}_per_second": total / max(self.seconds, 1e-9), **comm_figures(stats),
                "bytes_across_workers": across, f"bytes_across_workers_per_{self.unit.removesuffix('s')}": across / max(total, 1),
                **({"peak_memory_allocated_mib": round(peak_mib)} if peak_mib is not None else {})}])
            print0(f"done: {step} steps, {total:,} {self.unit}, val bpb {self.val_bpb:.4f}, {self.seconds:.1f} s training" +
                   (f", peak memory allocated {peak_mib:,.0f} MiB" if peak_mib is not None else "") +
                   f", checkpoint {self.ckpt_dir}")
        self.wandb_run.finish()
        compute_cleanup()
