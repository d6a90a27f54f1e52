"""What every training stage (base, mid, sft, rl) does around its optimizer steps, written once: the common
flags, the device-batch search, the lr and Muon momentum schedules, at which steps to evaluate, sample, save and
stop, doing that on theta_global, the optimizer-step loop itself (train_steps), the metrics log and the bytes
that crossed between workers. A stage script declares its data, loss, evaluation and defaults and calls these.

The sync object (DDP or DiLoCo) comes from the caller, nanochat never imports diloco. What is used of it:
sync.global_view() puts theta_global in the model and each worker's own weights back on exit, with no outer
step, so a mid-round eval or save never changes training; sync.synchronize() finishes the DiLoCo schedule
and runs once, at the last step.
"""

import contextlib
import json
import os
import time
from types import SimpleNamespace

import torch

from nanochat.common import UsageError, device_synchronize, print0
from nanochat.memory import (batch_size_arg, candidate_batch_sizes, explain_out_of_memory, find_device_batch_size,
                             training_step_trial)
from nanochat.optim import Muon


def scale_initial_lrs(optimizers, frac):
    """Fine-tuning stages train at a fraction of the pretraining lrs (--init-lr-frac)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= frac
            group["lr"] = group["initial_lr"]


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, constant, then a linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    warmup, warmdown = round(warmup_ratio * num_steps), round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    return (num_steps - step) / warmdown * (1 - final_lr_frac) + final_lr_frac


def muon_momentum(step, num_steps=None, warmdown_ratio=0.0, peak=0.95, final=0.90):
    """Muon's momentum warms up from 0.85 to `peak` over the first 300 steps of a fresh optimizer (nanochat's
    first release); with num_steps and warmdown_ratio > 0 it then falls linearly to `final` over the lr
    warmdown (less momentum, less noise carried into the annealed weights)."""
    warm = lambda s: 0.85 + (peak - 0.85) * min(s / 300, 1)
    start = num_steps - round(warmdown_ratio * num_steps) if num_steps and warmdown_ratio > 0 else None
    if start is None or step < start:
        return warm(step)
    progress = (step - start) / max(num_steps - start, 1)
    return warm(start) * (1 - progress) + final * progress


def set_schedule(optimizers, lrm, momentum=None, wd_frac=None):
    """Every group's lr = initial_lr * lrm; Muon's momentum and weight decay (initial * wd_frac) when given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                if momentum is not None:
                    group["momentum"] = momentum
                if wd_frac is not None:
                    group["weight_decay"] = group.get("initial_weight_decay", group["weight_decay"]) * wd_frac


def plan(step, num_steps, resumed_at=None, stop_after=-1, eval_every=0, sample_every=0, save_every=0):
    """What to do before optimizer step `step` (num_steps: after the last one): eval, sample, save, stop.
    Evals may run at step 0, samples and periodic saves after some training; the last step does all three
    and --stop-after saves. The step a run resumed at did its eval, sample and save before it stopped. A step
    past num_steps or stop_after (the sync object moved the run there, see loop_step) stops too."""
    last = step >= num_steps
    stop = last or (stop_after >= 0 and step >= stop_after)
    if step == resumed_at:
        return SimpleNamespace(last=last, stop=stop, eval=False, sample=False, save=False)
    due = lambda every: every > 0 and step % every == 0
    return SimpleNamespace(last=last, stop=stop, eval=last or due(eval_every),
                           sample=last or (due(sample_every) and step > 0), save=stop or (due(save_every) and step > 0))


@contextlib.contextmanager
def on_theta_global(sync, last):
    """Evaluate, sample and save inside (collective: every rank enters). A mid-round eval sees theta_global
    as of the last outer step; at the last step the schedule is finished first, so the final model has
    every worker's last inner steps in it."""
    if last:
        sync.synchronize()
    with sync.global_view():
        yield


def loop_step(step, sync):
    """The step the loop is at: `step`, unless the sync object owns the count (sync.owned_step not None). Elastic
    DiLoCo does: a worker healed from a live peer, at its join or at any later outer sync, continues at the
    peer's step, and the lr schedule, checkpoint numbering and stop point must follow it. Call after joining and
    after every sync.step(): step = loop_step(step + 1, sync)."""
    owned = getattr(sync, "owned_step", None)
    return step if owned is None else owned


def metrics_until(path, step):
    """The records of a metrics.jsonl up to a checkpoint at `step` (a loss record's step counts the steps done,
    an eval's is where it ran, before the save); later ones came from a run that died after that save."""
    with open(path) as f:
        return [record for record in map(json.loads, f) if record["step"] <= step]


def add_stage_args(parser, eval_every=None, device_batch_help=""):
    """The flags every training stage has (each adds its own data, model and optimiser flags)."""
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--run", default="", help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=1337, help="initialisation (and sampling) seed")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="order of the training data: 0 = the dataset's own, N > 0 = a permutation drawn from N")
    parser.add_argument("--device-batch-size", type=batch_size_arg, default=None, help=device_batch_help)
    parser.add_argument("--eval-every", type=int, default=eval_every, help="steps between val evals (0: only at the end)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this stage's tag")
    parser.add_argument("--stop-after", type=int, default=-1,
                        help="save and exit after this step without changing the schedule (time-sliced jobs)")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=-1, help="torch.compile (default: on CUDA)")
    return parser


def choose_device_batch_size(batch_size, largest, rows_per_rank, micro_step, model, optimizers, seq_len, device, sync):
    """--device-batch-size as the run will use it: "auto" searches the largest power of two up to `largest` that
    fits (changing no number of the run); it must divide the rows each rank takes per step, so accumulation keeps
    the total batch. From here on an out-of-memory error names the size and what to try."""
    if batch_size == "auto":
        trial = training_step_trial(micro_step, model, optimizers, seq_len, device, reserve_bytes=sync.later_device_bytes())
        batch_size, too_big = find_device_batch_size(trial, candidate_batch_sizes(rows_per_rank, largest), device)
        print0(f"--device-batch-size auto: {batch_size}" +
               (f" ({', '.join(map(str, too_big))} ran out of memory)" if too_big else " (fits)"))
    if rows_per_rank % batch_size:
        raise UsageError(f"--device-batch-size {batch_size} must divide the {rows_per_rank} rows each rank takes per "
                         f"step: use a divisor of it, or auto")
    explain_out_of_memory(batch_size)
    return batch_size, rows_per_rank // batch_size


class MetricsLog:
    """A stage's metrics.jsonl (rank 0) and wandb: kept up to the resume point, appended record by record."""

    def __init__(self, ckpt_dir, wandb_run, master, resumed_at=None):
        self.path, self.wandb_run, self.master = os.path.join(ckpt_dir, "metrics.jsonl"), wandb_run, master
        kept = metrics_until(self.path, resumed_at) if resumed_at is not None and os.path.exists(self.path) else []
        if master:  # the resumed run appends the rest
            os.makedirs(ckpt_dir, exist_ok=True)
            with open(self.path, "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in kept)

    def log(self, record, wandb=True):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if wandb:
            self.wandb_run.log(record)


def data_position(sync_config, rank, world_size):
    """(rank, world size) the training data is read as. Under --elastic each worker (its own torchrun job, whoever
    else is up) reads its own slot of the data, so no two workers train on the same documents or conversations."""
    slot, slots = sync_config.elastic.data_slot() if sync_config.elastic is not None else (0, 1)
    return slot * world_size + rank, slots * world_size


def bytes_across_workers(sync, stats):
    """Of comm.global_comm_stats(), the bytes that crossed between workers: the sync object knows which."""
    return stats[sync.across_workers]["bytes"]


class StepTimer:
    """Seconds between start() and stop(), read with seconds() once the device has been synchronised: CUDA events
    on CUDA (recorded on the stream, so timing adds no host sync of its own), the host clock elsewhere."""

    def __init__(self, device_type):
        self.cuda = device_type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def start(self):
        if self.cuda:
            self.events[0].record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[1].record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self):
        return self.events[0].elapsed_time(self.events[1]) / 1000 if self.cuda else self.t1 - self.t0


def train_steps(sync, start_step, num_steps, grad_accum_steps, micro_step, next_batch, schedule, *, device_type,
                resumed=False, stop_after=-1, eval_every=0, sample_every=0, save_every=0, at_checkpoint=None,
                on_step=None, backward=None):
    """The optimizer-step loop of every stage. Before each step (and after the last): at_checkpoint(step, at), on
    theta_global and on every rank, when plan() says to eval, sample or save. Each step: grad_accum_steps micro-steps
    of micro_step(*next_batch()) (the loss divided by grad_accum_steps is backpropagated), or, for a stage that makes
    its data inside the step (chat_rl's rollouts), backward(step) -> loss, having accumulated the gradients itself;
    then schedule(step) -> lr multiplier (it sets the optimizers' lrs), sync.step(); then on_step(step, loss, lrm,
    dt, opt_dt), dt the step's seconds (device synchronised), opt_dt those of sync.step() (the optimizers, and
    DiLoCo's outer exchange on its steps). The step comes from the sync object after every sync
    (loop_step: a healed elastic worker continues at its peers' step). -> (the last step reached, its plan)"""
    step, at, opt_timer = start_step, None, StepTimer(device_type)
    while True:
        at = plan(step, num_steps, resumed_at=start_step if resumed else None, stop_after=stop_after,
                  eval_every=eval_every, sample_every=sample_every, save_every=save_every)
        if at.eval or at.sample or at.save:
            with on_theta_global(sync, at.last):  # collective: every rank takes part
                at_checkpoint(step, at)
        if at.stop:
            break
        device_synchronize(device_type)
        t0 = time.time()
        if backward is not None:
            loss = backward(step)
        else:
            for _ in range(grad_accum_steps):
                loss = micro_step(*next_batch())
                (loss / grad_accum_steps).backward()
        lrm = schedule(step)
        opt_timer.start()
        sync.step()
        opt_timer.stop()
        device_synchronize(device_type)
        on_step(step, loss, lrm, time.time() - t0, opt_timer.seconds())
        step = loop_step(step + 1, sync)
    return step, at
