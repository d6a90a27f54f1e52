"""Atomic checkpoints: model, per-rank optimizer state, per-rank extras (sync state), a shared training state
that does not depend on the number of ranks (global data position, DiLoCo's theta_global and outer momentum by
parameter name, counters), and metadata.

Layout: <base>/checkpoints/<stage>/<model_tag>/step_000123/{model.pt, shared.pt, meta.json, optim_rank0.pt,
extra_rank0.pt, ...}. A resume with the same ranks and workers restores every rank exactly from its own files;
with another layout each rank starts its inner optimizer (and DiLoCo its own weights) fresh from shared.pt.
Every rank writes into step_000123.partial/; after a barrier rank 0 renames it into place, so a directory
without the .partial suffix is always complete (meta.json is written last, inside it, as a second guard).
Multi-node runs need the checkpoint directory on a shared filesystem, as nanochat does.
"""

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat import comm
from nanochat.common import UsageError, get_base_dir, logger, write_atomic
from nanochat.stage import STAGES, check_stage


class CheckpointNotFound(UsageError, FileNotFoundError):
    """No complete checkpoint where one was asked for; the message says which command makes one."""


def checkpoint_dir(stage, model_tag):
    check_stage(stage)
    return os.path.join(get_base_dir(), "checkpoints", stage, model_tag)


def _step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0, extra=None, shared=None):
    """Called by every rank. model_state/meta/shared are written by rank 0 only; optimizer_state and extra per rank."""
    final = _step_dir(ckpt_dir, step)
    partial = final + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    if rank == 0:
        _atomic_torch_save(_strip_compile_prefix(model_state), os.path.join(partial, "model.pt"))
        if shared is not None:
            _atomic_torch_save(shared, os.path.join(partial, "shared.pt"))
    if optimizer_state is not None:
        _atomic_torch_save(optimizer_state, os.path.join(partial, f"optim_rank{rank}.pt"))
    if extra is not None:
        _atomic_torch_save(extra, os.path.join(partial, f"extra_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        meta = dict(meta, step=step)
        write_atomic(os.path.join(partial, "meta.json"), json.dumps(meta, indent=2, default=str))
        if os.path.exists(final):  # re-saving the same step: move the old one aside, then drop it
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
            os.replace(partial, final)
            shutil.rmtree(final + ".old")
        else:
            os.replace(partial, final)
        logger.info(f"saved checkpoint {final}")
    _barrier()
    return final


def _strip_compile_prefix(state):
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def find_last_step(ckpt_dir):
    """Largest step with a complete checkpoint in ckpt_dir, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = []
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.exists(os.path.join(ckpt_dir, name, "meta.json")):
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def load_checkpoint(ckpt_dir, step, device, rank=0, load_optimizer=True):
    """(model_state, optimizer_state or None, meta, extra or None) of one rank."""
    d = _step_dir(ckpt_dir, step)
    meta_path = os.path.join(d, "meta.json")
    if not os.path.exists(meta_path):
        raise CheckpointNotFound(f"no complete checkpoint at {d}: pass the --step of one that exists (or none: the last)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        model_state = torch.load(os.path.join(d, "model.pt"), map_location=device)
        optimizer_state = extra = None
        optim_path, extra_path = os.path.join(d, f"optim_rank{rank}.pt"), os.path.join(d, f"extra_rank{rank}.pt")
        if load_optimizer and os.path.exists(optim_path):
            optimizer_state = torch.load(optim_path, map_location=device)
        if os.path.exists(extra_path):
            extra = torch.load(extra_path, map_location="cpu")
    except (RuntimeError, EOFError, json.JSONDecodeError, OSError) as e:
        raise RuntimeError(f"corrupt checkpoint {d}: {e}") from e
    return model_state, optimizer_state, meta, extra


def _load_shared(ckpt_dir, step):
    path = os.path.join(_step_dir(ckpt_dir, step), "shared.pt")
    try:
        return torch.load(path, map_location="cpu") if os.path.exists(path) else None
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f"corrupt checkpoint {path}: {e}") from e


def restore_training(ckpt_dir, model, optimizers, sync, device, rank, layout=None):
    """Load the last checkpoint of a training run (written by save_training) into its live objects.
    layout: {"world_size", "workers"} of this run. Saved with the same layout, every rank restores exactly what
    it saved: weights, its optimizer states, the sync state (DiLoCo's theta_global, outer momentum, counters and,
    after model.pt's theta_global, the worker's own weights) and its communication counters. With another layout
    (workers lost or added), the world-size-independent part is restored (theta_global, DiLoCo's outer state by
    parameter name, the global data position, counters) and each rank's inner optimizer starts fresh.
    Returns (step, meta, extra): extra = the stage's shared state plus, same layout only, this rank's own."""
    step = find_last_step(ckpt_dir)
    if step is None:
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir}")
    model_state, optim_state, meta, extra = load_checkpoint(ckpt_dir, step, device, rank=rank)
    shared = _load_shared(ckpt_dir, step)
    same_layout = layout is None or meta.get("layout", layout) == layout
    if same_layout and optim_state is not None and extra is not None and "sync" in extra:
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optim_state, strict=True):
            opt.load_state_dict(state)
        sync.load_state_dict(extra["sync"])
        comm.load_comm_stats(extra["comm"])
        logger.info(f"resumed from {ckpt_dir} step {step}")
        return step, meta, dict((shared or {}).get("extra", {}), **extra)
    if shared is None:
        raise UsageError(f"--resume: {_step_dir(ckpt_dir, step)} was saved by {meta.get('layout', 'another layout')} "
                         f"and holds no world-size-independent state (an older save, or a stage that keeps "
                         f"per-rank state only): resume with the same number of ranks and workers, or without --resume")
    model.load_state_dict(model_state)  # theta_global
    sync.load_portable_state_dict(shared["sync"])
    comm.load_comm_stats(shared["comm"] if rank == 0 else {})  # the totals continue, counted once
    logger.info(f"resumed from {ckpt_dir} step {step}, saved as {meta.get('layout')}, now {layout}: inner "
                f"optimizer state starts fresh on every rank")
    return step, meta, dict(shared["extra"])


def save_training(ckpt_dir, step, model, optimizers, sync, meta, rank, extra, shared=None, layout=None):
    """What restore_training reads, saved by every rank inside sync.global_view() (so model.pt is theta_global):
    this rank's optimizer and sync states (the sync's holds the worker's own weights), the communication
    counters, rank 0's seconds blocked on outer exchanges and the stage's own per-rank `extra`. With `shared`
    (the stage's world-size-independent state, e.g. the global data position) a shared.pt is written too, so
    the run can resume with another number of ranks or workers (collective: gathers the sync's portable state)."""
    sync_state = sync.state_dict()  # first: it may wait for exchanges in flight
    shared_state = None
    if shared is not None:
        portable, totals = sync.portable_state_dict(), comm.global_comm_stats()
        shared_state = {"sync": portable, "extra": shared,
                        "comm": {label: dict(s, calls=0) for label, s in totals.items()}}
    return save_checkpoint(ckpt_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers],
                           dict(meta, outer_wait_seconds=sync.wait_seconds, **({"layout": layout} if layout else {})),
                           rank=rank, extra=dict(extra, sync=sync_state, comm=comm.comm_stats()), shared=shared_state)


def latest_model_tag(stage):
    """The most recently written model tag of a stage."""
    root = os.path.join(get_base_dir(), "checkpoints", stage)
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))] if os.path.isdir(root) else []
    if not tags:
        raise CheckpointNotFound(f"no {stage} checkpoints under {root}: train one first (e.g. python -m "
                                 f"{STAGES[stage].script})")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


def build_model(model_state, meta, device, phase="eval"):
    from nanochat.gpt import GPTConfig, gpt_on_meta
    model = gpt_on_meta(GPTConfig.from_saved(meta["model_config"]))
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train(phase == "train")
    return model


def load_model(source, device, phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) of a saved stage. Latest tag and step unless given."""
    from nanochat.tokenizer import get_tokenizer
    model_tag = model_tag or latest_model_tag(source)
    ckpt_dir = checkpoint_dir(source, model_tag)
    step = find_last_step(ckpt_dir) if step is None else step
    if step is None:
        raise CheckpointNotFound(f"no complete checkpoint in {ckpt_dir}: train it first (python -m "
                                 f"{STAGES[source].script} ...), or pass the --model-tag of one that exists")
    model_state, _, meta, _ = load_checkpoint(ckpt_dir, step, device, load_optimizer=False)
    model = build_model(model_state, meta, device, phase)
    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == model.config.vocab_size, \
        f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {model.config.vocab_size}: wrong tokenizer for this checkpoint"
    meta = dict(meta, model_tag=model_tag, source=source)
    return model, tokenizer, meta
