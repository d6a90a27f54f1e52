"""GPU memory: the largest micro-batch that fits (--device-batch-size auto), and an out-of-memory error that
ends a run with one line saying what to try instead of a traceback.

The search tries micro-batches b from the stage's default down by halves, keeping only those that divide the
rows each rank processes per optimizer step, so gradient accumulation keeps the total batch whatever b is.
Each try is a real training step (forward + backward, the optimizer step that allocates its state, then a
second forward + backward with the gradients still held, as under accumulation), after which the weights and
the optimizer are put back: the search changes no number of the run. Under torchrun every rank tries the
same b and the ranks agree after each phase, so all of them take the same branch (none waits alone in a
collective) and all pick the same b.
"""

import argparse
import gc
import sys

import torch
import torch.distributed as dist

from nanochat import comm
from nanochat.common import UsageError


def batch_size_arg(value):
    """argparse type of --device-batch-size: a positive integer or "auto"."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a positive integer nor auto")
    return int(value)


def is_out_of_memory(exc):
    """torch's OutOfMemoryError, and the allocation failures some CUDA libraries report as plain RuntimeErrors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "ALLOC_FAILED"))


def candidate_batch_sizes(rows_per_rank, largest):
    """Powers of two up to `largest` that divide rows_per_rank (rows per rank per optimizer step), largest first."""
    sizes, b = [], 1
    while b <= min(largest, rows_per_rank) and rows_per_rank % b == 0:
        sizes.append(b)
        b *= 2
    return sizes[::-1]


def _all_ranks_ok(ok, device):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # a few bytes, once per phase of the search: not counted
    return bool(flag.item())


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def find_device_batch_size(trial, candidates, device):
    """The first of `candidates` (largest first) whose trial runs out of memory on no rank. trial(b) is a
    generator: it runs one phase of a training step per next() and must undo its effects when closed, however
    it ends. -> (batch size, the sizes that did not fit)"""
    too_big = []
    for b in candidates:
        phases, ok = trial(b), True
        while ok:
            try:
                next(phases)
            except StopIteration:
                break
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                ok = False
            ok = _all_ranks_ok(ok, device)
        phases.close()
        del phases
        release_memory(device)
        if ok:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, not the search's
            return b, too_big
        too_big.append(b)
    raise UsageError(f"out of memory even at --device-batch-size {candidates[-1]}: the model does not fit "
                     f"this device; use a smaller --depth or --max-seq-len")


def training_step_trial(micro_step, model, optimizers, seq_len, device, reserve_bytes=0):
    """trial(b) for find_device_batch_size: a training step at micro-batch b on dummy tokens. micro_step(x, y)
    -> loss is the training loop's own (same compiled graph, same autocast). The optimizers must be fresh
    (no step taken yet): their state is dropped again afterwards, the weights and the communication counts
    are put back. reserve_bytes are held aside during the try for memory the run allocates only later (a
    DiLoCo outer momentum on the GPU)."""
    if any(opt.state for opt in optimizers):
        raise ValueError("the batch-size search must run before the first optimizer step")
    params = list(model.parameters())

    def trial(b):
        saved_weights, saved_opts, saved_comm = None, [opt.state_dict() for opt in optimizers], comm.comm_stats()
        reserve = []
        try:
            reserve.append(torch.empty(reserve_bytes, dtype=torch.uint8, device=device))
            # memory does not depend on the ids; two tensors, as the loader's (aliased inputs would make
            # torch.compile specialise, and recompile for the real batches)
            x, y = (torch.zeros(b, seq_len, dtype=torch.long, device=device) for _ in range(2))
            micro_step(x, y).backward()
            yield  # the ranks agree here before the optimizer's collectives
            saved_weights = [p.detach().to("cpu", copy=True) for p in params]
            for opt in optimizers:
                opt.step()
            micro_step(x, y).backward()
            yield
        finally:  # also on an out-of-memory error and when closed early: leave no trace
            reserve.clear()
            x = y = None
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, saved in zip(params, saved_weights or []):
                    p.copy_(saved)
            for opt, state in zip(optimizers, saved_opts):
                opt.load_state_dict(state)
            comm.load_comm_stats(saved_comm)  # the trial's gradient all-reduces are not the run's traffic

    return trial


def out_of_memory_message(exc, batch_size, flag="--device-batch-size"):
    """One line: what ran out and at which micro-batch, and what to run instead."""
    what = str(exc).strip().split("\n")[0].split(". GPU ")[0].split(". Of the allocated")[0]
    if batch_size is None:
        return f"error: out of memory before training began ({what}): the model does not fit this device"
    if batch_size == 1:
        return (f"error: out of memory at {flag} 1 ({what}): the model does not fit this device; "
                f"use a smaller --depth or --max-seq-len")
    smaller = batch_size // next(d for d in range(2, batch_size + 1) if batch_size % d == 0)  # largest proper divisor
    return (f"error: out of memory at {flag} {batch_size} ({what}): try {flag} {smaller} "
            f"(gradient accumulation keeps the total batch), or {flag} auto")


_batch_size = None


def explain_out_of_memory(batch_size=None):
    """From now on an out-of-memory error that ends this process prints out_of_memory_message (at the micro-batch
    given by the latest call) instead of a traceback; the exit status is still 1. Checkpoints are written
    atomically, so an interrupted run leaves nothing half-written."""
    global _batch_size
    _batch_size = batch_size
    if getattr(sys.excepthook, "explains_out_of_memory", False):
        return
    fallback = sys.excepthook

    def hook(kind, exc, tb):
        if not is_out_of_memory(exc):
            return fallback(kind, exc, tb)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        print(("" if rank == 0 else f"rank {rank}: ") + out_of_memory_message(exc, _batch_size), file=sys.stderr, flush=True)

    hook.explains_out_of_memory = True
    sys.excepthook = hook
