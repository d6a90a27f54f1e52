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
     its own weights become theta_global and it contributes nothing to this round (weight 0).
  2. all-reduce sum over the quorum of [w * delta, w], w = inner steps this worker completed since its last
     outer step; the mean pseudo-gradient is sum(w delta) / sum(w).
  3. should_commit: if any peer failed during the exchange (died, timed out) nobody applies it; the
     survivors go back to 1 with the same pseudo-gradients, so they lose no inner step, and only the dead
     worker's steps since its last outer sync are lost.

Why torchft and not torchrun elastic: torchrun restarts every worker of the job when one fails, so the
survivors would fall back to the last checkpoint; torchft keeps them running, re-forms only the outer process
group, and heals a joiner from a live peer instead of from disk.
"""

import time
from datetime import timedelta

import torch
from torch.distributed import ReduceOp

from nanochat import comm
from nanochat.common import UsageError


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


class TorchftMembership:
    """A torchft Manager around this rank's outer exchange. state_fn / load_fn: what a joiner is healed with."""

    def __init__(self, state_fn, load_fn, replica_id, lighthouse, min_workers, timeout_s, device, max_retries=10,
                 rank=None, world_size=None, store_addr=None, store_port=None):
        try:
            from torchft.manager import Manager
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL
        except ImportError as e:
            raise UsageError(f"--elastic torchft needs the torchft package ({e}): pip install torchft==0.2.0") from e
        self.healed, self.max_retries = False, max_retries

        def load(state):
            load_fn(state)
            self.healed = True  # this worker's pseudo-gradient of the round is void: it now holds theta_global

        timeout = timedelta(seconds=timeout_s)
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(pg=pg, load_state_dict=load, state_dict=state_fn, min_replica_size=min_workers,
                               use_async_quorum=False, replica_id=replica_id or None, lighthouse_addr=lighthouse or None,
                               rank=rank, world_size=world_size, store_addr=store_addr, store_port=store_port,
                               timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout)
        comm.label_group(self, "outer")

    def workers(self):
        return self.manager.num_participants()

    def weighted_mean(self, contribution):
        """contribution() -> (this worker's flat fp32 pseudo-gradient, its weight); called after any healing.
        Returns the weighted mean over the workers present, identical on all of them (None: nothing to apply)."""
        for _ in range(self.max_retries):
            self.manager.start_quorum()  # blocks for the quorum; heals this worker if it is behind
            delta, weight = contribution()
            if self.healed:
                delta, weight, self.healed = torch.zeros_like(delta), 0, False
            flat = torch.cat([delta * weight, torch.tensor([float(weight)], device=delta.device)])
            k = self.manager.num_participants()
            # counted like comm's ring all-reduce (torchft's process group bypasses comm's wrappers)
            with comm.counted(self, 2 * (k - 1) * flat.numel() * 4 // k if k > 1 else 0):
                self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
            if self.manager.should_commit():  # every peer finished the exchange: apply it
                return None if flat[-1] == 0 else flat[:-1] / flat[-1]
            time.sleep(0.1)  # a peer failed mid-exchange: form a new quorum without it and send again
        raise RuntimeError(f"the outer exchange failed {self.max_retries} times in a row (--max-outer-retries): "
                           f"check that at least --min-workers workers are up and reach the Lighthouse")

    def shutdown(self):
        self.manager.shutdown(wait=False)


class ElasticCodec:
    """Stands in for the codec of the one fragment under --elastic: fp32 values through the torchft exchange,
    weighted by the inner steps this worker completed (weight_fn)."""

    name = "none"

    def __init__(self, membership, weight_fn):
        self.membership, self.weight_fn = membership, weight_fn

    def exchange(self, flat, group):
        return self.membership.weighted_mean(lambda: (flat, self.weight_fn()))

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
