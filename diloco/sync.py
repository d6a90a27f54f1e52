"""The synchronisation seam: DDP (average gradients every step) or DiLoCo (sync every H inner steps).

A training script builds its process groups, model and inner optimizers, then drives one sync object:

    groups = make_worker_groups(args)                    # inner group = the ranks that average gradients
    optimizers = model.setup_optimizers(..., process_group=groups.inner)
    sync = make_sync(args, model, optimizers, groups)
    for step ...: forward/backward; sync.step()            # DiLoCo also does the outer step every H steps
    sync.synchronize()                                   # before eval/sample/save: model = theta_global

DiLoCo (Douillard et al. 2023): the N ranks form K workers of N/K consecutive ranks. Inside a worker the
inner optimizers average gradients every step over the worker's own group (exactly the DDP path, smaller
world). Every H inner steps, each worker's pseudo-gradient theta_global - theta_worker is averaged across
workers (outer group), an SGD/Nesterov outer optimizer updates theta_global in fp32, and every rank copies
it back. Inner optimizer state stays local across rounds.

With several ranks per worker, rank j of each worker owns every g-th parameter (g = ranks per worker): it
keeps theta_global and the outer momentum for those, all-reduces only their pseudo-gradients across the
workers, and broadcasts the result inside its worker. So each worker sends one copy of the model across
the slow link per sync, not g copies.

The outer learning rate is constant (as in the paper); the inner optimizers carry the LR schedule.
"""

import torch
import torch.distributed as dist

from diloco.compress import KINDS, Compressor
from nanochat import comm
from nanochat.common import get_dist_info


def add_sync_args(parser):
    g = parser.add_argument_group("synchronisation: DDP or DiLoCo")
    g.add_argument("--sync", choices=["ddp", "diloco"], default="ddp",
                   help="ddp: average gradients every step; diloco: workers sync every --diloco-h steps")
    g.add_argument("--diloco-h", type=int, default=100, help="inner steps between outer syncs")
    g.add_argument("--diloco-workers", type=int, default=0,
                   help="number of workers K (0 = one per rank); the N ranks form K workers of N/K consecutive "
                        "ranks, e.g. K = number of nodes/sites")
    g.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (constant)")
    g.add_argument("--outer-momentum", type=float, default=0.9, help="outer SGD momentum")
    g.add_argument("--outer-nesterov", type=int, choices=[0, 1], default=1, help="Nesterov outer momentum")
    g.add_argument("--outer-device", choices=["cpu", "gpu"], default="gpu",
                   help="where theta_global and the outer momentum live (gpu = the model's device)")
    g.add_argument("--outer-compression", choices=KINDS, default="none",
                   help="compression of the outer all-reduce (error feedback on)")
    g.add_argument("--collective-timeout", type=float, default=600.0,
                   help="seconds a collective waits for a peer before the run fails")
    return parser


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


def make_worker_groups(args):
    """Process groups for the chosen sync mode. Called by every rank (new_group is collective)."""
    ddp, rank, _, world_size = get_dist_info()
    if not (ddp and dist.is_initialized()):
        return WorkerGroups(1, 1, 0, 0, None, None)
    if args.sync == "ddp":
        comm.label_group(dist.group.WORLD, "inner")
        return WorkerGroups(world_size, 1, rank, 0, dist.group.WORLD, None)
    k = args.diloco_workers or world_size
    if k < 1 or world_size % k != 0:
        raise ValueError(f"--diloco-workers {k} must divide the number of ranks ({world_size})")
    g = world_size // k
    inner = outer = None
    for w in range(k):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(w * g, (w + 1) * g)))
        if rank // g == w:
            inner = group
    for j in range(g):
        group = dist.new_group([w * g + j for w in range(k)])
        if rank % g == j:
            outer = group
    comm.label_group(inner, "inner")
    comm.label_group(outer, "outer")
    return WorkerGroups(k, g, rank // g, rank % g, inner, outer)


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

    def __init__(self, model, optimizers, groups):
        self.model, self.optimizers, self.groups = model, optimizers, groups
        broadcast_parameters(model)

    def step(self):
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def synchronize(self):
        pass  # replicas never drift

    def state_dict(self):
        return {"mode": "ddp"}

    def load_state_dict(self, state):
        pass  # nothing to restore; a DiLoCo state is ignored (its theta_global is the saved model)


class DiLoCoSync:
    mode = "diloco"

    def __init__(self, model, optimizers, groups, h, outer_lr, outer_momentum, outer_nesterov,
                 outer_device, compression="none"):
        assert h >= 1, "--diloco-h must be >= 1"
        self.model, self.optimizers, self.groups, self.h = model, optimizers, groups, h
        broadcast_parameters(model)
        params = list(model.parameters())
        g = groups.ranks_per_worker
        # owner of parameter i inside a worker: local index i % g
        self.owned_by = [[p for i, p in enumerate(params) if i % g == j] for j in range(g)]
        self.owned = self.owned_by[groups.local_index]
        device = params[0].device if outer_device == "gpu" else torch.device("cpu")
        self.theta_global = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in self.owned]
        nesterov = bool(outer_nesterov) and outer_momentum > 0
        self.outer_optimizer = torch.optim.SGD(self.theta_global, lr=outer_lr, momentum=outer_momentum,
                                               nesterov=nesterov)
        self.compressor = Compressor(compression, [t.numel() for t in self.theta_global], device)
        self.inner_steps = 0  # inner steps since the last outer sync
        self.num_syncs = 0

    def step(self):
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.inner_steps += 1
        if self.inner_steps >= self.h:
            self.outer_step()

    def synchronize(self):
        """Force an outer step now if inner steps happened since the last one (before eval/sample/save)."""
        if self.inner_steps > 0:
            self.outer_step()

    @torch.no_grad()
    def outer_step(self):
        # pseudo-gradient of this worker for the parameters this rank owns, averaged across workers
        deltas = [theta - p.detach().to(theta.device, torch.float32) for theta, p in zip(self.theta_global, self.owned)]
        if deltas:
            flat = self.compressor.all_reduce_mean(torch.cat([d.reshape(-1) for d in deltas]), self.groups.outer)
            offset = 0
            for theta in self.theta_global:
                theta.grad = flat[offset:offset + theta.numel()].view_as(theta).clone()
                offset += theta.numel()
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            for theta, p in zip(self.theta_global, self.owned):
                p.copy_(theta)
        self._share_within_worker()
        self.inner_steps = 0
        self.num_syncs += 1

    def _share_within_worker(self):
        """Each rank broadcasts the parameters it owns to the other ranks of its worker."""
        groups = self.groups
        if groups.ranks_per_worker == 1:
            return
        for j, params in enumerate(self.owned_by):
            if not params:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            comm.broadcast(flat, src=groups.global_rank(groups.worker_id, j), group=groups.inner)
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def state_dict(self):
        return {"mode": "diloco", "theta_global": [t.cpu() for t in self.theta_global],
                "outer_optimizer": self.outer_optimizer.state_dict(), "compressor": self.compressor.state_dict(),
                "inner_steps": self.inner_steps, "num_syncs": self.num_syncs}

    def load_state_dict(self, state):
        """Restore a DiLoCo state; a DDP checkpoint (or none) starts the outer loop fresh from the weights."""
        if not state or state.get("mode") != "diloco":
            return
        for theta, saved in zip(self.theta_global, state["theta_global"], strict=True):
            theta.copy_(saved)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.compressor.load_state_dict(state["compressor"])
        self.inner_steps, self.num_syncs = state["inner_steps"], state["num_syncs"]


def make_sync(args, model, optimizers, groups):
    if args.sync == "ddp":
        return DDPSync(model, optimizers, groups)
    return DiLoCoSync(model, optimizers, groups, h=args.diloco_h, outer_lr=args.outer_lr,
                      outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov,
                      outer_device=args.outer_device, compression=args.outer_compression)
