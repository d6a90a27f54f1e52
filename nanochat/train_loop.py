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


def muon_momentum(step):
    """nanochat's warmup of Muon's momentum from 0.85 to 0.95 over the first 300 steps of a fresh optimizer."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedule(optimizers, lrm, momentum=None):
    """Every group's lr = initial_lr * lrm; Muon's momentum too, when given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and isinstance(opt, Muon):
                group["momentum"] = momentum


def plan(step, num_steps, resumed_at=None, stop_after=-1, eval_every=0, sample_every=0, save_every=0):
    """What to do before optimizer step `step` (num_steps: after the last one): eval, sample, save, stop.
    Evals may run at step 0, samples and periodic saves after some training; the last step does all three
    and --stop-after saves. The step a run resumed at did its eval, sample and save before it stopped."""
    last = step == num_steps
    stop = last or step == stop_after
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


def metrics_until(path, step):
    """The records of a metrics.jsonl up to a checkpoint at `step` (a loss record's step counts the steps done,
    an eval's is where it ran, before the save); later ones came from a run that died after that save."""
    with open(path) as f:
        return [record for record in map(json.loads, f) if record["step"] <= step]
