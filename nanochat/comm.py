"""Collectives that count what they send, per process-group label ("inner", "outer", ...).

Bytes are what this rank sends on the wire under the bandwidth-optimal ring model, for a group of K ranks
and a tensor of n bytes (integer math, so figures are exact and reproducible):

    all_reduce (sum or mean)              2 (K-1) n // K   reduce-scatter then all-gather of n/K chunks
    all_gather (n bytes in, from each)      (K-1) n        this rank's n bytes reach K-1 peers
    all_to_all_single (n bytes in)          (K-1) n // K   keeps its own 1/K, sends the rest (= reduce-scatter)
    broadcast (n bytes)                     (K-1) n // K   a share of the (K-1) n any broadcast tree moves

At K = 2 an all-reduce counts n and an all-gather n, the payload handed in. The sum over a group's ranks
is what crosses its links, which is the figure that matters when comparing DDP, DiLoCo and codecs whose
cost grows differently with K. Groups of one rank send nothing and are not counted. Time is wall time
spent inside the call (blocking collectives), including any test delay set with set_comm_delay.

Counting is thread-safe: an outer exchange may run on a background thread while the inner steps count
their own collectives on the main one.
"""

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

_labels = {}  # id(group) -> label; None (the world) is "world"
_delays = {}  # label -> seconds every collective on such a group sleeps (a test hook for slow links)
_lock = threading.Lock()
_stats = defaultdict(lambda: {"bytes": 0, "calls": 0, "seconds": 0.0})


def label_group(group, label):
    _labels[id(group)] = label


def group_label(group):
    return _labels.get(id(group), "world")


def group_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def set_comm_delay(label, seconds):
    """Every collective on a group labelled `label` sleeps `seconds` inside the call (0 removes the delay)."""
    if seconds < 0:
        raise ValueError(f"comm delay for {label!r} must be >= 0 seconds, got {seconds}")
    if seconds == 0:
        _delays.pop(label, None)
    else:
        _delays[label] = float(seconds)


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


@contextmanager
def counted(group, wire_bytes):
    """Time the collective run inside (plus any test delay) and count `wire_bytes` against the group's label.
    Public for collectives that run outside this module (torchft's, in diloco/membership.py)."""
    label = group_label(group)
    t0 = time.perf_counter()
    delay = _delays.get(label, 0.0)
    if delay:
        time.sleep(delay)
    yield
    _record(label, wire_bytes, time.perf_counter() - t0)


def all_reduce_mean(tensor, group=None):
    """In-place mean over `group`, counted. gloo has no AVG, so SUM then divide."""
    size = group_size(group)
    if size == 1:
        return tensor
    with counted(group, 2 * (size - 1) * _nbytes(tensor) // size):
        if dist.get_backend(group) == "nccl":
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=group)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            tensor.div_(size)
    return tensor


def all_reduce_sum(tensor, group=None):
    size = group_size(group)
    if size == 1:
        return tensor
    with counted(group, 2 * (size - 1) * _nbytes(tensor) // size):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast(tensor, src, group=None):
    size = group_size(group)
    if size == 1:
        return tensor
    with counted(group, (size - 1) * _nbytes(tensor) // size):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather(tensor, group=None):
    """List of every rank's `tensor` (same shape everywhere)."""
    size = group_size(group)
    if size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(size)]
    with counted(group, (size - 1) * _nbytes(tensor)):
        dist.all_gather(out, tensor, group=group)
    return out


def all_gather_into_tensor(output, input, group=None):
    """output (contiguous, K x input's elements) = every rank's `input` in rank order, any shapes."""
    size = group_size(group)
    if size == 1:
        output.view(-1).copy_(input.reshape(-1))
        return output
    # torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with counted(group, (size - 1) * _nbytes(input)):
        gather(output.view(-1), input.reshape(-1), group=group)  # gloo wants matching flat shapes
    return output


def all_to_all_single(output, input, group=None):
    """Split `input` into K equal parts along dim 0: part j goes to rank j; output part i came from rank i."""
    size = group_size(group)
    if size == 1:
        output.copy_(input)
        return output
    with counted(group, (size - 1) * _nbytes(input) // size):
        dist.all_to_all_single(output, input, group=group)
    return output


def _record(label, nbytes, seconds):
    with _lock:
        s = _stats[label]
        s["bytes"] += nbytes
        s["calls"] += 1
        s["seconds"] += seconds


def comm_stats():
    """Snapshot: {label: {"bytes", "calls", "seconds"}} since start (or the last reset)."""
    with _lock:
        return {k: dict(v) for k, v in _stats.items()}


def global_comm_stats(labels=("inner", "outer", "world")):
    """{label: {"bytes", "seconds"}} summed over all ranks (the bookkeeping reduce itself is not counted)."""
    mine = comm_stats()
    local = torch.tensor([[mine[l]["bytes"], mine[l]["seconds"]] if l in mine else [0.0, 0.0] for l in labels],
                         dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            local = local.cuda()
        dist.all_reduce(local)
    return {l: {"bytes": int(local[i, 0].item()), "seconds": local[i, 1].item()} for i, l in enumerate(labels)}


def load_comm_stats(saved):
    """Continue counting from a checkpoint's figures (so cumulative bytes survive a resume)."""
    with _lock:
        _stats.clear()
        for label, s in saved.items():
            _stats[label].update(s)


def reset_comm_stats():
    with _lock:
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
