"""What every training stage (base, mid, sft, rl) does around its optimizer steps, written once: the lr and
Muon momentum schedules, at which steps to evaluate, sample, save and stop, and doing that on theta_global.

The sync object (DDP or DiLoCo) comes from the caller, nanochat never imports diloco. What is used of it:
sync.global_view() puts theta_global in the model and each worker's own weights back on exit, with no outer
step, so a mid-round eval or save never changes training; sync.synchronize() finishes the DiLoCo schedule
and runs once, at the last step.
"""

import contextlib
import json
from types import SimpleNamespace

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
