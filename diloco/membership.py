"""Who is in the outer group now: static process groups (make_worker_groups), or torchft for workers that die,
leave and join mid-run.

With --elastic torchft every worker (site) is its own torchrun job (its ranks average gradients every step over
their own world) and the workers meet only through a torchft Lighthouse, which forms a quorum of the workers
present at each outer sync. Each rank has a torchft Manager; rank j of every worker exchanges the pieces of
theta_global it owns with rank j of the others over a torchft process group that the Manager re-forms when
the quorum changes, so membership changes only at outer-sync boundaries. One outer exchange:

  1. start_quorum: wait for the workers arriving at this boundary (a dead one is dropped after the
     Lighthouse's heartbeat timeout). A worker behind the others (a fresh joiner, a restart) is healed there:
     it receives theta_global, the outer optimizer state and the step counters from a live peer over HTTP,
     its own weights become theta_global and it contributes nothing to this round (weight 0). "Behind" is
     torchft's rule: a step below the quorum's highest. The step each worker reports is its inner step, not
     torchft's own count of committed exchanges: a site restored from a checkpoint saved after round r has the
     same count as a live peer now at round r + 1 (that round is not committed yet), so torchft would not heal
     it and the two would go on a round apart, averaging as if in step.
  2. all-reduce sum over the quorum of [w * delta, w, hashes], w = inner steps this worker completed since its
     last outer step; the mean pseudo-gradient is sum(w delta) / sum(w). hashes: each worker's 64-bit hash of
     its theta_global in its own slot, so every worker checks that all hold the same; one that differs is
     healed at once and the round exchanged again (workers never fork silently). The all-reduce has a progress
     deadline scaled by the bytes in flight and the measured link rate, so a silent peer costs seconds.
  3. should_commit: if any peer failed during the exchange (died, timed out) nobody applies it; the
     survivors go back to 1 with the same pseudo-gradients, so they lose no inner step, and only the dead
     worker's steps since its last outer sync are lost.

Why torchft and not torchrun elastic: torchrun restarts every worker of the job when one fails, so the
survivors would fall back to the last checkpoint; torchft keeps them running, re-forms only the outer process
group, and heals a joiner from a live peer instead of from disk.
"""

import logging
import os
import sys
import time
from datetime import timedelta

import torch
from torch.distributed import AllreduceOptions, ReduceOp

from nanochat import comm
from nanochat.common import UsageError

logger = logging.getLogger("nanochat")


def add_membership_args(g):
    g.add_argument("--elastic", choices=["off", "torchft"], default="off",
                   help="torchft: DiLoCo workers may die, leave and join mid-run (each worker its own torchrun job, "
                        "all meeting at --lighthouse); off: a fixed set of workers, a dead one fails the run")
    g.add_argument("--lighthouse", default="",
                   help="torchft Lighthouse address, e.g. http://host:29510 (default: $TORCHFT_LIGHTHOUSE); start "
                        "one with `torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000`")
    g.add_argument("--replica-id", default="", help="--elastic: this worker's name (e.g. the site); also picks its "
                                                    "data slot when it ends in a number")
    g.add_argument("--max-workers", type=int, default=8,
                   help="--elastic: most workers a run may have; worker n reads data slot n of this many (disjoint)")
    g.add_argument("--min-workers", type=int, default=1, help="--elastic: an outer step needs this many workers present")
    g.add_argument("--max-outer-retries", type=int, default=10,
                   help="--elastic: an outer exchange that fails this many times in a row stops the run")
    g.add_argument("--peer-timeout", type=float, default=10.0,
                   help="--elastic: seconds a silent peer is waited for inside an outer exchange, on top of 3x the "
                        "exchange's transfer time at the measured link rate (keep above the Lighthouse's heartbeat "
                        "timeout)")
    g.add_argument("--link-mbps", type=float, default=0.0,
                   help="--elastic: link rate between sites (Mbit/s) for the outer exchanges' deadline until one is "
                        "measured (0: --collective-timeout until then)")


class ElasticError(RuntimeError):
    """An elastic run cannot go on (the Lighthouse is gone, the outer exchange keeps failing); one line says what
    to do. Training scripts print it instead of a traceback (explain_elastic_errors)."""


def explain_elastic_errors():
    """From now on an ElasticError that ends this process prints one line (exit status 1, no traceback)."""
    if getattr(sys.excepthook, "explains_elastic_errors", False):
        return
    fallback = sys.excepthook

    def hook(kind, exc, tb):
        if not isinstance(exc, ElasticError):
            return fallback(kind, exc, tb)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # torchft's native threads (heartbeats, checkpoint server) must not hold the exit

    hook.explains_elastic_errors = True
    sys.excepthook = hook


class _QuorumStep(logging.Handler):
    """torchft logs each new quorum's id and step (logger "torchft_quorums") just before it re-forms the outer
    process group; the step is kept here for that group's store prefix (_step_prefixed)."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def emit(self, record):
        self.step = getattr(record, "step", self.step)


_quorum_step = _QuorumStep()


def _step_prefixed(process_group_class):
    """A torchft process group whose rendezvous keys are prefixed with the quorum's step as well as its id. A
    restarted Lighthouse numbers its quorums from 1 again, and the workers' stores still hold the keys of the old
    quorums of those numbers: without the step, a re-formed group reads a dead peer's address and fails to connect
    (torchft 0.2.0). All members of a quorum get the same step (its highest) with it."""

    class StepPrefixed(process_group_class):
        def configure(self, store_addr, *args, **kwargs):
            return super().configure(f"{store_addr}/step{_quorum_step.step}", *args, **kwargs)

    return StepPrefixed


def theta_checksum(tensors, chunk=1 << 22):
    """A 64-bit hash of the exact bits of fp32 tensors: sum over i of (bits_i + c) * (2 i + 1) modulo 2^64. Integer
    sums wrap exactly whatever the reduction order, so two sites (any devices) agree iff their bits do (up to
    hash collisions); chunks bound the temporary int64 memory."""
    total, offset = None, 0
    for t in tensors:
        bits = t.detach().reshape(-1).view(torch.int32)
        for lo in range(0, bits.numel(), chunk):
            part = bits[lo:lo + chunk].to(torch.int64)
            pos = torch.arange(offset + lo, offset + lo + part.numel(), device=part.device, dtype=torch.int64)
            s = ((part + 0x9E3779B9) * (2 * pos + 1)).sum()
            total = s if total is None else total + s
        offset += bits.numel()
    return 0 if total is None else int(total.item()) & 0xFFFFFFFFFFFFFFFF


def _hash_fields(h):
    """A 64-bit hash as four 16-bit integers, each exact in fp32 (so it rides in the fp32 sum all-reduce)."""
    return [float((h >> (16 * i)) & 0xFFFF) for i in range(4)]


class TorchftMembership:
    """A torchft Manager around this rank's outer exchange. state_fn / load_fn: what a joiner is healed with.

    Timeouts (torchft 0.2.0's Manager): `timeout` bounds a heal's HTTP transfer and the commit RPCs, and
    `quorum_timeout` how long one quorum request may wait: both --collective-timeout (a heal moves the whole outer
    state over the link). The outer all-reduce itself runs in chunks of about --peer-timeout / 2 seconds at the
    measured link rate, each with a progress deadline of --peer-timeout plus twice its transfer time: a peer
    that goes silent inside an exchange (killed behind a slow link, paused, cut off) is given up on within about
    2 x --peer-timeout, not after --collective-timeout. A Lighthouse that stops answering is asked again about once
    a second for --collective-timeout (torchft's quorum_retries), then the run stops with one line saying how to
    resume."""

    min_chunk = 1 << 16  # values per all-reduce chunk at least (each call costs a few round trips)

    def __init__(self, state_fn, load_fn, replica_id, lighthouse, min_workers, timeout_s, device, max_retries=10,
                 rank=None, world_size=None, store_addr=None, store_port=None, peer_timeout_s=10.0, link_mbps=0.0):
        try:
            from torchft.manager import Manager
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL
        except ImportError as e:
            raise UsageError(f"--elastic torchft needs the torchft package ({e}): pip install torchft==0.2.0") from e
        self.healed, self.max_retries, self.lighthouse = False, max_retries, lighthouse
        self.timeout_s, self.peer_timeout_s, self.link_mbps = timeout_s, peer_timeout_s, link_mbps
        self.rates = []  # bytes/s of the last chunks exchanged with a peer (the link rate, measured)
        self.mismatches = 0  # outer syncs at which the workers' theta_global differed (each healed)
        self.last_workers, self.last_mismatch = 0, False  # of the last exchange: was a heal likely in this one?
        self.behind = False  # this worker's theta_global differed from the quorum's: report a lower step, to be healed

        def load(state):
            load_fn(state)
            self.healed = True  # this worker's pseudo-gradient of the round is void: it now holds theta_global

        timeout = timedelta(seconds=timeout_s)
        quorums = logging.getLogger("torchft_quorums")
        if _quorum_step not in quorums.handlers:
            quorums.setLevel(logging.INFO)
            quorums.addHandler(_quorum_step)
        self.pg = _step_prefixed(ProcessGroupNCCL if device.type == "cuda" else ProcessGroupGloo)(timeout=timeout)
        self.manager = Manager(pg=self.pg, load_state_dict=load, state_dict=state_fn, min_replica_size=min_workers,
                               use_async_quorum=False, replica_id=replica_id or None, lighthouse_addr=lighthouse or None,
                               rank=rank, world_size=world_size, store_addr=store_addr, store_port=store_port,
                               timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout,
                               quorum_retries=max(1, round(timeout_s)))  # ~1 s apart (torchft: timeout / (retries + 1))
        comm.label_group(self, "outer")
        explain_elastic_errors()

    def workers(self):
        return self.manager.num_participants()

    def weighted_mean(self, contribution, checksum, step):
        """contribution() -> (this worker's flat fp32 pseudo-gradient, its weight); checksum() -> 64-bit hash of this
        rank's theta_global; both called after any healing. step() -> this worker's inner step (healing moves it).
        Returns the weighted mean over the workers present, identical on all of them (None: nothing to apply).

        The hashes ride in the same all-reduce (4 fp32 fields per worker, each worker its own slot): every worker
        sees all of them, and one whose theta_global differs from the most common one (ties: the lowest rank's)
        reports itself one step behind at the next quorum, which heals it from a peer; the round is then exchanged
        again. Workers never go on from different theta_global."""
        for attempt in range(self.max_retries):
            self._start_quorum(step() - self.behind)  # blocks for the quorum; heals this worker if it is behind
            self.behind = False
            delta, weight = contribution()
            if self.healed:
                delta, weight, self.healed = torch.zeros_like(delta), 0, False
            k, me = self.manager.num_participants(), self.manager.participating_rank() or 0
            hashes = torch.zeros(k, 4, device=delta.device)
            hashes[me] = torch.tensor(_hash_fields(checksum()), device=delta.device)
            flat = torch.cat([delta * weight, torch.tensor([float(weight)], device=delta.device), hashes.reshape(-1)])
            # counted like comm's ring all-reduce (torchft's process group bypasses comm's wrappers)
            wire = 2 * (k - 1) * flat.numel() * 4 // k if k > 1 else 0
            # a joiner may be fetching the outer state (theta_global and momentum: 8 bytes a value) from a peer while
            # the others wait in the first chunk: likely at a first exchange, a grown quorum, a mismatch heal
            heal = 8 * delta.numel() if k != self.last_workers or self.last_mismatch else 0
            with comm.counted(self, wire):
                self._allreduce(flat, k, heal, attempt)
            if not self.manager.should_commit():  # a peer failed mid-exchange: form a new quorum without it, send again
                time.sleep(0.1)
                continue
            self.last_workers, self.last_mismatch = k, False
            seen = [int(sum(int(v) << (16 * i) for i, v in enumerate(row))) for row in flat[-4 * k:].view(k, 4).tolist()]
            if len(set(seen)) == 1:
                return None if flat[-1 - 4 * k] == 0 else flat[:-1 - 4 * k] / flat[-1 - 4 * k]
            reference = max(seen, key=lambda h: (seen.count(h), -seen.index(h)))
            self.mismatches, self.last_mismatch = self.mismatches + 1, True
            logger.warning(f"outer sync {self.manager.current_step()}: theta_global differs between the workers "
                           f"({sum(h != reference for h in seen)} of {k}); "
                           + ("this worker is healed from a peer" if seen[me] != reference else "healing the other"))
            self.behind = seen[me] != reference  # then the next quorum heals this worker
        raise ElasticError(f"the outer exchange failed {self.max_retries} times in a row (--max-outer-retries): "
                           f"check that at least --min-workers workers are up and reach the Lighthouse "
                           f"{self.lighthouse}, then restart each site with its command plus --resume")

    def link_rate(self):
        """Bytes/s of the link between the workers: the slowest of the last chunks sent, else --link-mbps, else None."""
        if self.rates:
            return min(self.rates)
        return self.link_mbps * 1e6 / 8 if self.link_mbps > 0 else None

    def _allreduce(self, flat, k, heal_bytes, attempt):
        """Sum `flat` over the quorum in place, in chunks of about --peer-timeout / 2 seconds at link_rate() (the
        whole of it while the rate is unknown), each with a progress deadline (_deadline_s): a peer that went
        silent is given up on within about 2 x --peer-timeout, however long the whole exchange takes. A failure
        is reported to the manager (should_commit() then says no on every worker). Returns whether it completed."""
        if self.manager.errored():  # the quorum or a heal failed: nothing to send this round
            return False
        rate = self.link_rate()
        per_chunk = flat.numel() if rate is None else max(self.min_chunk, int(rate * self.peer_timeout_s / 2 / 4))
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        for lo in range(0, flat.numel(), per_chunk):
            part = flat[lo:lo + per_chunk]
            wire = 2 * (k - 1) * part.numel() * 4 // k
            deadline_s = self._deadline_s(wire + (heal_bytes if lo == 0 else 0), attempt)
            opts.timeout = timedelta(seconds=deadline_s)
            t0 = time.perf_counter()
            try:
                self.pg.allreduce([part], opts).wait()
            except Exception as e:  # a peer died, was cut off or went silent past the deadline
                logger.warning(f"outer exchange failed (deadline {deadline_s:.1f} s): {e}")
                self.manager.report_error(e)
                return False
            if k > 1 and not (lo == 0 and heal_bytes):  # (a heal's wait says nothing about the link)
                self.rates = (self.rates + [wire / max(time.perf_counter() - t0, 1e-6)])[-5:]
        return True

    def _deadline_s(self, bytes_in_flight, attempt):
        """How long one chunk may take: --peer-timeout plus twice the transfer time of its bytes at link_rate(),
        doubled on each retry (a link slower than measured costs a retry, not the run); --collective-timeout
        while the rate is unknown and at most."""
        rate = self.link_rate()
        if rate is None:
            return self.timeout_s
        return min(self.timeout_s, (self.peer_timeout_s + 2 * bytes_in_flight / rate) * 2 ** attempt)

    def _start_quorum(self, step):
        """manager.start_quorum() at inner step `step`: torchft heals the workers whose step is below the quorum's
        highest (module docstring, 1.). While the Lighthouse does not answer, torchft's manager server asks it again
        about once a second (quorum_retries) until --collective-timeout, reconnecting each time, so a Lighthouse
        restarted within that time is picked up; past it the run stops with one line saying how to resume."""
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})
        t0 = time.monotonic()
        try:
            self.manager.start_quorum()
        except Exception as e:
            raise ElasticError(f"no quorum from the torchft Lighthouse {self.lighthouse} for "
                               f"{time.monotonic() - t0:.0f} s (--collective-timeout {self.timeout_s:.0f}; "
                               f"{type(e).__name__}: {str(e)[:200]}): it is down or unreachable. Restart it "
                               f"(torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000, same address), then "
                               f"every site with its same command plus --resume: each restores its last checkpoint "
                               f"and the older ones are healed from the newest") from None

    def shutdown(self):
        self.manager.shutdown(wait=False)


class ElasticCodec:
    """Stands in for the codec of the one fragment under --elastic: fp32 values through the torchft exchange,
    weighted by the inner steps this worker completed (weight_fn), with a hash of theta_global (checksum_fn), at the
    worker's inner step (step_fn)."""

    name = "none"

    def __init__(self, membership, weight_fn, checksum_fn, step_fn):
        self.membership, self.weight_fn, self.checksum_fn, self.step_fn = membership, weight_fn, checksum_fn, step_fn

    def exchange(self, flat, group):
        return self.membership.weighted_mean(lambda: (flat, self.weight_fn()), self.checksum_fn, self.step_fn)

    def state_dict(self):
        return {"codec": self.name}

    def load_state_dict(self, state):
        if state.get("codec") != self.name:
            raise ValueError(f"checkpoint's outer codec is {state.get('codec')!r}; --elastic runs use none")


def data_slot(replica_id, max_workers):
    """(slot, slots) of this worker's share of the data under --elastic: the number its --replica-id ends in."""
    digits = len(replica_id) - len(replica_id.rstrip("0123456789"))
    slot = int(replica_id[-digits:]) if digits else 0
    if not 0 <= slot < max_workers:
        raise UsageError(f"--replica-id {replica_id!r}: its number must be below --max-workers {max_workers}")
    return slot, max_workers
