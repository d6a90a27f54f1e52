"""Fragments of the model for (Streaming) DiLoCo: which weights sync together, and one fragment's outer sync.

The model says where its fragments are through the order it registers its parameters (GPT: embedding,
blocks in depth order, lm_head). The flat sequence is cut into F runs of about equal size, so the peak
bytes of one sync event is 1/F of the model; a cut falls at the nearest row of the tensor it lands in (a
large embedding may span two fragments). F = 1 is plain DiLoCo: one fragment holding every parameter whole.

A fragment's outer sync is split in two, as torchft does, so the exchange can overlap inner steps:
  launch():  pseudo-gradient delta = theta_global - local weights (the pieces this rank owns), handed to the
             codec's exchange, run inline or on a background thread (returns a Pending);
  finish():  waits for the across-worker mean, steps the outer optimizer on theta_global, and sets the local
             weights to alpha * local + (1 - alpha) * theta_global (alpha = 0: plain DiLoCo's copy-back).
"""

import time
from concurrent.futures import Future

import torch


def split_into_fragments(params, num_fragments):
    """Lists of views: `num_fragments` contiguous runs of `params` (in order) of about equal numel."""
    total = sum(p.numel() for p in params)
    bounds = [total * f / num_fragments for f in range(1, num_fragments)]  # where fragment f+1 starts
    fragments = [[] for _ in range(num_fragments)]
    pos = 0
    for p in params:
        data = p.detach()
        rows = data.shape[0] if data.dim() else 1
        per_row = max(1, data.numel() // max(rows, 1))
        f = sum(b <= pos for b in bounds)  # fragment of the first row
        cuts = [0] + [round((b - pos) / per_row) for b in bounds if pos < b < pos + data.numel()] + [rows]
        for lo, hi in zip(cuts, cuts[1:]):
            if hi > lo:
                fragments[f].append(data if (lo, hi) == (0, rows) else data[lo:hi])
            f += 1
        pos += data.numel()
    if any(not frag for frag in fragments):
        raise ValueError(f"--diloco-fragments {num_fragments}: the model cannot be cut into that many non-empty "
                         f"fragments; use fewer")
    return fragments


class Pending:
    """An outer exchange in flight: the future of its result, the step it was launched at."""

    def __init__(self, future, launched_at, done_event=None):
        self.future, self.launched_at, self.done_event = future, launched_at, done_event


class Fragment:
    """One fragment: all its pieces (views of the model's weights), the ones this rank owns, their
    theta_global (fp32, on the outer device) and the codec that carries their pseudo-gradient."""

    def __init__(self, pieces, owners, local_index, outer_device, codec):
        self.pieces = pieces
        self.owners = owners  # owners[i]: the rank inside the worker that keeps theta_global for pieces[i]
        self.owned = [p for p, o in zip(pieces, owners) if o == local_index]
        self.theta = [p.to(device=outer_device, dtype=torch.float32, copy=True) for p in self.owned]
        # --outer-device cpu under CUDA: theta_global in pinned host memory, so its copies to and from the GPU run
        # asynchronously; the pseudo-gradient, the exchange (nccl takes CUDA tensors only) and the codec stay on
        # the GPU, only the outer optimizer steps on the host (its momentum never leaves it)
        self.host_side = bool(self.owned) and self.owned[0].is_cuda and torch.device(outer_device).type == "cpu"
        if self.host_side:
            self.theta = [t.pin_memory() for t in self.theta]
            self.host_mean = torch.empty(sum(t.numel() for t in self.theta), pin_memory=True)
        self.codec = codec

    @torch.no_grad()
    def launch(self, group, step, executor=None, side_stream=None):
        """Compute this rank's pseudo-gradient and start its exchange (inline when executor is None)."""
        if not self.theta:
            delta = None
        else:
            delta = torch.cat([(theta.to(p.device, non_blocking=True) - p.float()).reshape(-1)
                               for theta, p in zip(self.theta, self.owned)])
        if executor is None:
            future = Future()
            future.set_result(self.codec.exchange(delta, group) if delta is not None else None)
            return Pending(future, step)
        if delta is None:
            future = Future()
            future.set_result(None)
            return Pending(future, step)
        if side_stream is None:
            return Pending(executor.submit(self.codec.exchange, delta, group), step)
        # CUDA: the exchange runs on a side stream that first waits for delta to be computed
        ready = torch.cuda.Event()
        ready.record()
        done = torch.cuda.Event()

        def run():
            with torch.cuda.stream(side_stream):
                side_stream.wait_event(ready)
                delta.record_stream(side_stream)
                result = self.codec.exchange(delta, group)
                done.record(side_stream)
            return result

        return Pending(executor.submit(run), step, done)

    @torch.no_grad()
    def finish(self, pending, outer_optimizer, alpha):
        """Apply a finished exchange; returns the seconds spent waiting for it."""
        t0 = time.perf_counter()
        mean = pending.future.result()
        waited = time.perf_counter() - t0
        if pending.done_event is not None:
            torch.cuda.current_stream().wait_event(pending.done_event)
        if mean is None:
            return waited
        host = self.host_side and mean.is_cuda  # (a resumed exchange's result is already on the host)
        if host:  # the mean comes down into pinned memory; the outer step needs it there, so wait for it
            mean = self.host_mean.copy_(mean, non_blocking=True)
            torch.cuda.current_stream().synchronize()
        offset = 0
        for theta in self.theta:
            grad = mean[offset:offset + theta.numel()].view_as(theta)
            theta.grad = grad if host else grad.clone()
            offset += theta.numel()
        outer_optimizer.step()  # only this fragment's theta have a gradient: the others are skipped
        for theta in self.theta:
            theta.grad = None
        # from pinned memory these copies are asynchronous: the next write to theta (the next round's outer step)
        # comes after the synchronize above, so a copy in flight never reads a half-updated theta
        for theta, p in zip(self.theta, self.owned):
            if alpha:
                p.mul_(alpha).add_(theta.to(p.device, p.dtype, non_blocking=True), alpha=1 - alpha)
            else:
                p.copy_(theta, non_blocking=True)
        return waited
