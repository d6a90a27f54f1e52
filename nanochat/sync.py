"""The synchronisation seam of every training stage, owned by nanochat: what a training loop asks of the object
that keeps the replicas in step, and the DDP one (average gradients every step). diloco/sync.py implements the
same protocol for DiLoCo; nanochat trains DDP without it.

    groups = ddp_worker_groups()                          # or diloco.make_worker_groups(config)
    optimizers = model.setup_optimizers(..., process_group=groups.inner)
    sync = DDPSync(model, optimizers, groups)             # or diloco.make_sync(config, ...)
    for step ...: forward/backward; sync.step()
    with sync.global_view(): evaluate / sample / save      # the model holds the global weights inside
    sync.synchronize()                                    # once, at the end

A script picks its sync library once (scripts/sync_choice.py): diloco when it is importable, else this module.
Both offer add_sync_args(parser), make_worker_groups(config) and make_sync(config, model, optimizers, groups); the
config (here DDPConfig; .mode, .elastic and .collective_timeout) is built from the flags by scripts/flags.py.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from nanochat import comm
from nanochat.common import collective_timeout, get_dist_info


@runtime_checkable
class Sync(Protocol):
    """What nanochat/train_loop.py, nanochat/checkpoint.py and the stage scripts use of a sync object."""

    mode: str  # "ddp", "diloco": recorded in checkpoints and reports
    across_workers: str  # comm label of the traffic between workers: "inner" (DDP) or "outer" (DiLoCo)
    inner_step: int  # optimizer steps in the outer schedule (an --elastic joiner starts where its peers are)
    wait_seconds: float  # time the training loop was blocked on exchanges beyond the per-step all-reduce
    owned_step: int | None  # the step the loop must continue at (elastic DiLoCo after a heal), None: the loop's own

    def join(self) -> None:
        """Meet the peers (elastic: after any resume, so only a newer live peer overwrites the restored state)."""

    def step(self) -> None:
        """Step the inner optimizers (gradients already averaged over groups.inner) and zero the gradients."""

    def set_total_steps(self, steps: int) -> None:
        """The run's number of optimizer steps (an outer schedule may end differently)."""

    def later_device_bytes(self) -> int:
        """Device bytes allocated only after the first step: a batch-size search holds them aside."""

    def global_view(self):
        """Context manager (collective): inside, the model holds the global weights; afterwards its own."""

    def synchronize(self) -> None:
        """Finish the schedule (collective), once, at the last step."""

    def state_dict(self) -> dict:
        """This rank's state: resume with the same ranks and workers continues exactly."""

    def load_state_dict(self, state: dict) -> None: ...

    def portable_state_dict(self) -> dict | None:
        """The state that does not depend on the number of ranks or workers (collective; None off rank 0)."""

    def load_portable_state_dict(self, state: dict) -> None: ...


class WorkerGroups:
    """Who this rank is in the K-workers layout, and the process groups it talks over."""

    def __init__(self, num_workers, ranks_per_worker, worker_id, local_index, inner, outer):
        self.num_workers = num_workers
        self.ranks_per_worker = ranks_per_worker
        self.worker_id = worker_id
        self.local_index = local_index  # this rank's index inside its worker
        self.inner = inner  # gradients are averaged over this group every step
        self.outer = outer  # DiLoCo pseudo-gradients travel over this group (None for DDP)

    def global_rank(self, worker_id, local_index):
        return worker_id * self.ranks_per_worker + local_index


def ddp_worker_groups():
    """DDP's layout: every rank is a worker and gradients are averaged over the whole world."""
    ddp, rank, _, world_size = get_dist_info()
    if not (ddp and dist.is_initialized()):
        return WorkerGroups(1, 1, 0, 0, None, None)
    comm.label_group(dist.group.WORLD, "inner")
    return WorkerGroups(world_size, 1, rank, 0, dist.group.WORLD, None)


def broadcast_parameters(model, src=0):
    """Every rank starts from rank src's weights (one flat broadcast over the world)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p.data for p in model.parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])
    comm.broadcast(flat, src=src)
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class DDPSync:
    """Gradients are averaged inside the inner optimizers (over groups.inner); this just steps them."""

    mode = "ddp"
    across_workers = "inner"  # every step's gradient all-reduce crosses between workers
    inner_step = 0  # no outer schedule
    wait_seconds = 0.0  # the gradient all-reduce is counted by comm, per step
    owned_step = None  # the training loop counts the steps

    def join(self):
        pass  # a fixed set of ranks

    def __init__(self, model, optimizers, groups):
        self.model, self.optimizers, self.groups = model, optimizers, groups
        broadcast_parameters(model)

    def step(self):
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def later_device_bytes(self):
        return 0  # nothing beyond the model and its inner optimizers

    def set_total_steps(self, steps):
        pass  # no outer schedule

    def synchronize(self):
        pass  # replicas never drift

    @contextmanager
    def global_view(self):
        yield  # every rank already holds the global weights

    def state_dict(self):
        return {"mode": "ddp"}

    def load_state_dict(self, state):
        pass  # nothing to restore; a DiLoCo state is ignored (its theta_global is the saved model)

    def portable_state_dict(self):
        return {"mode": "ddp"}

    def load_portable_state_dict(self, state):
        pass  # the weights are model.pt; a DiLoCo run's outer state does not carry over to DDP


@dataclass
class DDPConfig:
    """DDP's settings (nanochat alone: the --sync flags are --sync ddp and these).

    Args:
        comm_delay_s: test hook: every gradient all-reduce sleeps this long.
        collective_timeout: seconds a collective waits for a peer before the run fails.
    """
    mode: str = "ddp"
    elastic: None = None  # workers that come and go need DiLoCo (diloco/membership.py)
    comm_delay_s: float = 0.0
    collective_timeout: float = field(default_factory=collective_timeout)


def add_sync_args(parser):
    g = parser.add_argument_group("synchronisation (DDP; install diloco/ for DiLoCo)")
    g.add_argument("--sync", choices=["ddp"], default="ddp", help="ddp: average gradients every step")
    g.add_argument("--comm-delay-ms", type=float, default=0.0, help="test hook: every gradient all-reduce sleeps this long")
    g.add_argument("--collective-timeout", type=float, default=collective_timeout(),
                   help="seconds a collective waits for a peer before the run fails (default: $NANOCHAT_COLLECTIVE_TIMEOUT "
                        "or 600)")
    return parser


def make_worker_groups(config):
    return ddp_worker_groups()


def make_sync(config, model, optimizers, groups):
    if config.comm_delay_s:
        comm.set_comm_delay("inner", config.comm_delay_s)
    return DDPSync(model, optimizers, groups)
