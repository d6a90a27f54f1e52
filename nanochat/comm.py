"""Collectives that count what they send, per process-group label ("inner", "outer", ...).

Bytes are the payload one rank hands to the collective (numel x element size), which is the figure that
matters when comparing DDP with DiLoCo: both use the same all-reduce algorithm, so wire traffic scales
with it. Time is wall time spent inside the call (blocking collectives).
"""

import time
from collections import defaultdict

import torch
import torch.distributed as dist

_labels = {}  # id(group) -> label; None (the world) is "world"
_stats = defaultdict(lambda: {"bytes": 0, "calls": 0, "seconds": 0.0})


def label_group(group, label):
    _labels[id(group)] = label


def group_label(group):
    return _labels.get(id(group), "world")


def group_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_mean(tensor, group=None):
    """In-place mean over `group`, counted. gloo has no AVG, so SUM then divide."""
    size = group_size(group)
    if size == 1:
        return tensor
    t0 = time.perf_counter()
    if dist.get_backend(group) == "nccl":
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=group)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(size)
    _record(group, tensor.numel() * tensor.element_size(), time.perf_counter() - t0)
    return tensor


def all_reduce_sum(tensor, group=None):
    if group_size(group) == 1:
        return tensor
    t0 = time.perf_counter()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    _record(group, tensor.numel() * tensor.element_size(), time.perf_counter() - t0)
    return tensor


def broadcast(tensor, src, group=None):
    if group_size(group) == 1:
        return tensor
    t0 = time.perf_counter()
    dist.broadcast(tensor, src=src, group=group)
    _record(group, tensor.numel() * tensor.element_size(), time.perf_counter() - t0)
    return tensor


def all_gather(tensor, group=None):
    """List of every rank's `tensor` (same shape everywhere), counted as the payload this rank hands in."""
    size = group_size(group)
    if size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(size)]
    t0 = time.perf_counter()
    dist.all_gather(out, tensor, group=group)
    _record(group, tensor.numel() * tensor.element_size(), time.perf_counter() - t0)
    return out


def _record(group, nbytes, seconds):
    s = _stats[group_label(group)]
    s["bytes"] += nbytes
    s["calls"] += 1
    s["seconds"] += seconds


def comm_stats():
    """Snapshot: {label: {"bytes", "calls", "seconds"}} since start (or the last reset)."""
    return {k: dict(v) for k, v in _stats.items()}


def global_comm_stats(labels=("inner", "outer", "world")):
    """{label: {"bytes", "seconds"}} summed over all ranks (the bookkeeping reduce itself is not counted)."""
    local = torch.tensor([[_stats[l]["bytes"], _stats[l]["seconds"]] if l in _stats else [0.0, 0.0]
                          for l in labels], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            local = local.cuda()
        dist.all_reduce(local)
    return {l: {"bytes": int(local[i, 0].item()), "seconds": local[i, 1].item()} for i, l in enumerate(labels)}


def load_comm_stats(saved):
    """Continue counting from a checkpoint's figures (so cumulative bytes survive a resume)."""
    _stats.clear()
    for label, s in saved.items():
        _stats[label].update(s)


def reset_comm_stats():
    _stats.clear()


def flat_all_reduce_mean(tensors, group=None):
    """Average a list of tensors with one collective: pack into one flat buffer, reduce, unpack."""
    if group_size(group) == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_mean(flat, group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
