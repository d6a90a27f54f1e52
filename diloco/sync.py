"""The synchronisation seam: DDP (average gradients every step) or DiLoCo (sync every H inner steps).

A training script builds its process groups, model and inner optimizers, then drives one sync object (the
protocol nanochat/sync.py defines; DDPSync lives there, so nanochat trains DDP without this package):

    config = SyncConfig(mode="diloco", h=100)            # a script's: its --sync flags (scripts/flags.py)
    groups = make_worker_groups(config)                  # inner group = the ranks that average gradients
    optimizers = model.setup_optimizers(..., process_group=groups.inner)
    sync = make_sync(config, model, optimizers, groups)
    for step ...: forward/backward; sync.step()            # DiLoCo also runs its outer schedule
    with sync.global_view(): evaluate / sample / save       # model = theta_global; no outer step happens
    sync.synchronize()                                   # once, at the end: finish the schedule

DiLoCo (Douillard et al. 2023): the N ranks form K workers of N/K consecutive ranks. Inside a worker the
inner optimizers average gradients every step over the worker's own group (exactly the DDP path, smaller
world). Every H inner steps, each worker's pseudo-gradient theta_global - theta_worker is averaged across
workers (outer group) through a codec (diloco/codecs.py), an outer optimizer (SGD/Nesterov by default,
passed in as an object) updates theta_global in fp32, and every rank copies it back. Inner optimizer state
stays local across rounds.

Streaming DiLoCo (Douillard et al. 2025): the model is cut into F fragments (diloco/fragments.py), each
synced every H steps, fragment f at steps n = round((f+1) H/F) mod H, so the link carries 1/F of the model
at a time. With overlap tau >= 1 a fragment's exchange is launched tau inner steps before it is applied and
runs on a background thread (a side CUDA stream on GPU) while inner steps go on; when applied, the local
weights become alpha * local + (1 - alpha) * theta_global. F = 1, tau = 0, alpha = 0 is plain DiLoCo.

With several ranks per worker, rank j of each worker owns every g-th tensor piece (g = ranks per worker):
it keeps theta_global and the outer momentum for those, exchanges only their pseudo-gradients across the
workers, and broadcasts the result inside its worker. So each worker sends one copy of the model across
the slow link per H steps, not g copies.

Evaluation never changes training: global_view() swaps theta_global into the model (as of each fragment's
last outer step; a mid-round evaluation sees the last synced weights) and puts the worker's own weights back
afterwards. state_dict() holds everything needed to continue exactly at any step: theta_global, the outer
optimizer and codec state, this worker's own weights, the inner-step counter and the results of exchanges
in flight (drained at the save point: waiting earlier changes no number).

The outer learning rate is constant (as in the paper) unless one of two drift-aware variants is asked for:
--outer-lr-warmup N raises it linearly over the first N x H inner steps (small early outer steps while the
workers' pseudo-gradients still point far apart), and --outer-final-average makes the exchange applied at the
end of training a plain average of the workers (outer lr 1, no momentum: nothing extrapolated into the final
weights). Both only rescale what the outer optimizer is given and depend only on the step an exchange was
launched at, so resume stays exact. The inner optimizers carry the inner LR schedule.
"""

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from diloco.codecs import CODECS, CodecConfig, add_codec_args, make_codec
from diloco.fragments import Fragment, Pending, split_into_fragments
from diloco.membership import ElasticCodec, TorchftMembership, add_membership_args, data_slot, theta_checksum
from nanochat import comm
from nanochat.common import UsageError, collective_timeout, get_dist_info
from nanochat.sync import DDPSync, WorkerGroups, broadcast_parameters, ddp_worker_groups

__all__ = ["DDPSync", "DiLoCoSync", "ElasticConfig", "SyncConfig", "WorkerGroups", "add_sync_args", "broadcast_parameters",
           "make_sync", "make_worker_groups"]


@dataclass
class ElasticConfig:
    """torchft membership: DiLoCo workers that die, leave and join mid-run (diloco/membership.py).

    Args:
        lighthouse: the torchft Lighthouse address, e.g. http://host:29510 ("": $TORCHFT_LIGHTHOUSE).
        replica_id: this worker's name; a number it ends in picks its data slot.
        max_workers: most workers a run may have; worker n reads data slot n of this many.
        min_workers: an outer step needs this many workers present.
        max_outer_retries: an outer exchange that fails this many times in a row stops the run.
        peer_timeout: seconds of no progress after which a peer inside an exchange is taken for dead (each
            chunk of the outer all-reduce gets this plus twice its transfer time at the measured link rate).
        link_mbps: the link rate between sites in Mbit/s before one is measured (0: unknown; the first
            exchange may then wait up to the collective timeout).
    """
    lighthouse: str = ""
    replica_id: str = ""
    max_workers: int = 8
    min_workers: int = 1
    max_outer_retries: int = 10
    peer_timeout: float = 10.0
    link_mbps: float = 0.0

    def data_slot(self):
        """(slot, slots): this worker reads slot `slot` of the data cut into `slots` disjoint shares."""
        return data_slot(self.replica_id, self.max_workers)


@dataclass
class SyncConfig:
    """How the replicas of a run are kept in step. Scripts build it from the --sync flags (scripts/flags.py).

    Args:
        mode: "ddp" (average gradients every step) or "diloco" (workers sync every h inner steps).
        h: inner steps between two outer syncs of each fragment.
        workers: DiLoCo workers K (0: one per rank); the N ranks form K workers of N/K consecutive ranks.
        outer_lr: the outer SGD learning rate (constant unless outer_lr_warmup).
        outer_momentum: the outer SGD momentum (0 when the codec keeps the momentum itself).
        outer_nesterov: Nesterov outer momentum.
        outer_lr_warmup: the outer lr rises linearly over the first outer_lr_warmup x h inner steps (0: constant).
        outer_final_average: the exchange applied at the end of training is a plain average (lr 1, no momentum).
        outer_device: where theta_global and the outer momentum live: "gpu" (the model's device) or "cpu".
        fragments: Streaming DiLoCo: fragments F of the model, synced in turn, each every h steps (1: plain).
        overlap: inner steps between launching a fragment's exchange and applying it (0: blocking; < h / F).
        alpha: when a fragment syncs, local = alpha * local + (1 - alpha) * theta_global.
        codec: how pseudo-gradients travel across workers (diloco/codecs.py).
        elastic: torchft membership, or None for a fixed set of workers (a dead one fails the run).
        comm_delay_s: test hook: every collective across workers sleeps this long.
        collective_timeout: seconds a collective waits for a peer before the run fails.
    """
    mode: str = "ddp"
    h: int = 100
    workers: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    outer_lr_warmup: int = 0
    outer_final_average: bool = False
    outer_device: str = "gpu"
    fragments: int = 1
    overlap: int = 0
    alpha: float = 0.0
    codec: CodecConfig = field(default_factory=CodecConfig)
    elastic: ElasticConfig | None = None
    comm_delay_s: float = 0.0
    collective_timeout: float = field(default_factory=collective_timeout)


def add_sync_args(parser):
    d = SyncConfig()
    g = parser.add_argument_group("synchronisation: DDP or DiLoCo")
    g.add_argument("--sync", choices=["ddp", "diloco"], default=d.mode,
                   help="ddp: average gradients every step; diloco: workers sync every --diloco-h steps")
    g.add_argument("--diloco-h", type=int, default=d.h, help="inner steps between outer syncs")
    g.add_argument("--diloco-workers", type=int, default=d.workers,
                   help="number of workers K (0 = one per rank); the N ranks form K workers of N/K consecutive "
                        "ranks, e.g. K = number of nodes/sites")
    g.add_argument("--outer-lr", type=float, default=d.outer_lr, help="outer SGD learning rate (constant)")
    g.add_argument("--outer-momentum", type=float, default=d.outer_momentum, help="outer SGD momentum")
    g.add_argument("--outer-nesterov", type=int, choices=[0, 1], default=int(d.outer_nesterov), help="Nesterov outer momentum")
    g.add_argument("--outer-lr-warmup", type=int, default=d.outer_lr_warmup,
                   help="outer lr rises linearly over the first N x H inner steps: an exchange launched at step s "
                        "uses lr x min(1, s / (N H)) (0: constant)")
    g.add_argument("--outer-final-average", type=int, choices=[0, 1], default=int(d.outer_final_average),
                   help="1: the exchange applied at the end of training (launched at the last step) is a plain average "
                        "of the workers: outer lr 1, no momentum")
    g.add_argument("--outer-device", choices=["cpu", "gpu"], default=d.outer_device,
                   help="where theta_global and the outer momentum live (gpu = the model's device; cpu: pinned "
                        "host memory, copied asynchronously, the exchange itself still on the GPU)")
    g.add_argument("--diloco-fragments", type=int, default=d.fragments,
                   help="Streaming DiLoCo: fragments F of the model, synced in turn, each every H steps (1 = plain)")
    g.add_argument("--diloco-overlap", type=int, default=d.overlap,
                   help="Streaming DiLoCo: launch a fragment's exchange this many inner steps before applying it, "
                        "overlapping communication with compute (0 = blocking; must be < H/F)")
    g.add_argument("--fragment-alpha", type=float, default=d.alpha,
                   help="when a fragment syncs, local = alpha * local + (1 - alpha) * theta_global (0 = plain copy)")
    add_codec_args(g)
    add_membership_args(g)
    g.add_argument("--comm-delay-ms", type=float, default=0.0,
                   help="test hook: every collective across workers (DDP: inner, DiLoCo: outer) sleeps this long")
    g.add_argument("--collective-timeout", type=float, default=collective_timeout(),
                   help="seconds a collective waits for a peer before the run fails (default: $NANOCHAT_COLLECTIVE_TIMEOUT "
                        "or 600)")
    return parser


def make_worker_groups(config):
    """Process groups for config.mode (a SyncConfig). Called by every rank (new_group is collective)."""
    ddp, rank, _, world_size = get_dist_info()
    if not (ddp and dist.is_initialized()):
        return WorkerGroups(1, 1, 0, 0, None, None)
    if config.mode == "ddp":
        if config.elastic is not None:
            raise UsageError("--elastic needs --sync diloco: DDP averages gradients every step, so a dead rank "
                             "fails the run within --collective-timeout (resume from the last checkpoint)")
        return ddp_worker_groups()
    if config.elastic is not None:  # this torchrun job is one worker; the others are reached through torchft
        comm.label_group(dist.group.WORLD, "inner")
        return WorkerGroups(1, world_size, 0, rank, dist.group.WORLD, None)
    k = config.workers or world_size
    if k < 1 or world_size % k != 0:
        raise UsageError(f"--diloco-workers {k} must divide the number of ranks ({world_size})")
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


class DiLoCoSync:
    """The sync protocol of nanochat/sync.py for DiLoCo and Streaming DiLoCo (module docstring)."""

    mode = "diloco"
    across_workers = "outer"  # only the pseudo-gradients cross between workers

    def __init__(self, model, optimizers, groups, config, outer_optimizer=None, codec_factory=None,
                 membership_factory=None):
        """config: a SyncConfig (mode "diloco"). outer_optimizer: params -> torch.optim.Optimizer over theta_global
        (fp32), stepped one fragment at a time (only that fragment's tensors carry a gradient); default: SGD from
        config. codec_factory: (sizes, device) -> codec; default: config.codec. membership_factory:
        (heal_state_fn, heal_fn) -> TorchftMembership (diloco/membership.py), default: from config.elastic; the
        outer exchange then runs over whichever workers are present, and this worker joins at once."""
        h, fragments, overlap, alpha = config.h, config.fragments, config.overlap, config.alpha
        if h < 1:
            raise UsageError(f"--diloco-h {h}: must be >= 1")
        if not 1 <= fragments <= h:
            raise UsageError(f"--diloco-fragments {fragments}: must be between 1 and --diloco-h ({h})")
        self.phase = [round((f + 1) * h / fragments) % h for f in range(fragments)]  # fragment f applies at n % h
        first = min(round((f + 1) * h / fragments) for f in range(fragments))
        if not 0 <= overlap < first:
            raise UsageError(f"--diloco-overlap {overlap}: must be >= 0 and < {first} (H/F): an exchange is "
                             f"launched after the first inner step and must land before the fragment's next launch")
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--fragment-alpha {alpha}: must be in [0, 1]")
        if config.outer_lr_warmup < 0:
            raise UsageError(f"--outer-lr-warmup {config.outer_lr_warmup}: must be >= 0 (outer steps)")
        if membership_factory is None and config.elastic is not None:
            if config.codec.name != "none":
                raise UsageError("--elastic torchft sends fp32 pseudo-gradients: use --outer-compression none")
            membership_factory = lambda state_fn, load_fn: _torchft_membership(config, state_fn, load_fn, model)
        if membership_factory is not None and (fragments, overlap) != (1, 0):
            raise UsageError("--elastic torchft runs plain DiLoCo: use --diloco-fragments 1 --diloco-overlap 0")
        if outer_optimizer is None:
            outer_optimizer = default_outer_optimizer(config)
        if codec_factory is None:
            codec_factory = lambda sizes, device: make_codec(config.codec, sizes, device)
        lr_warmup, final_average, outer_device = config.outer_lr_warmup, config.outer_final_average, config.outer_device
        self.lr_warmup, self.final_average, self.total_steps = lr_warmup, final_average, None
        self.model, self.optimizers, self.groups = model, optimizers, groups
        self.h, self.overlap, self.alpha = h, overlap, alpha
        broadcast_parameters(model)
        self.params = list(model.parameters())
        self.device = self.params[0].device if outer_device == "gpu" else torch.device("cpu")  # outer state
        self.comm_device = self.params[0].device  # pseudo-gradients, codecs and exchanges (nccl: CUDA tensors only)
        g, me = groups.ranks_per_worker, groups.local_index
        self.fragments, index = [], 0
        for f, pieces in enumerate(split_into_fragments(self.params, fragments)):
            owners = [(index + i) % g for i in range(len(pieces))]  # owner of a piece inside the worker
            index += len(pieces)
            sizes = [p.numel() for p, o in zip(pieces, owners) if o == me]
            codec = None if membership_factory else codec_factory(sizes, self.comm_device)  # elastic: set below
            self.fragments.append(Fragment(pieces, owners, me, self.device, codec))
        self.outer_optimizer = outer_optimizer([t for frag in self.fragments for t in frag.theta])
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="diloco-outer") if overlap else None
        self.side_stream = torch.cuda.Stream(self.comm_device) if overlap and self.comm_device.type == "cuda" else None
        self.inner_step = 0  # inner steps since this sync object started (or since the run started, on resume)
        self.last_launch = [0] * fragments  # inner step of each fragment's last launched exchange
        self.last_applied = [0] * fragments  # inner step at which each fragment's last exchange was applied
        self.pending = {}  # fragment index -> Pending
        self.num_syncs = 0  # fragment syncs applied (F per H steps)
        self.wait_seconds = 0.0  # time the training loop was blocked on outer exchanges
        self._backup = None  # the worker's own weights while global_view() shows theta_global
        self.membership = None
        if membership_factory is not None:
            self.membership = membership_factory(self._heal_state, self._heal)
            self.fragments[0].codec = ElasticCodec(self.membership, lambda: self.inner_step - self.last_launch[0],
                                                   lambda: theta_checksum(self.fragments[0].theta),
                                                   lambda: self.inner_step)
        self.joined = self.membership is None

    def join(self):
        """--elastic: meet the other workers at their next outer sync, healed from a live peer if it is ahead.
        Call after restoring a checkpoint (then only a newer peer overwrites it); the first step() joins otherwise."""
        if not self.joined:
            self.joined = True
            self.outer_step()

    @property
    def owned_step(self):
        """The step the run is at when this sync object decides it (--elastic: a heal at any outer sync moves this
        worker to its peers' step, and the loop's schedule, checkpoints and stop follow); None otherwise."""
        return self.inner_step if self.membership is not None else None

    def _heal_state(self):
        """What a joining worker is healed with (torchft sends it from a live peer at the quorum)."""
        return {"theta_global": [[t.cpu() for t in frag.theta] for frag in self.fragments],
                "outer_optimizer": self.outer_optimizer.state_dict(), "inner_step": self.inner_step,
                "last_launch": list(self.last_launch), "last_applied": list(self.last_applied),
                "num_syncs": self.num_syncs}

    def _heal(self, state):
        """A peer's outer state: theta_global (also this rank's own pieces of the model), outer momentum,
        counters. The inner optimizer state stays this worker's own (fresh for a new process)."""
        with torch.no_grad():
            for frag, saved in zip(self.fragments, state["theta_global"], strict=True):
                for theta, p, t in zip(frag.theta, frag.owned, saved, strict=True):
                    theta.copy_(t)
                    p.copy_(t)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._load_counters(state)
        self.num_syncs = state["num_syncs"]

    def _load_counters(self, state):
        self.inner_step, self.last_launch = state["inner_step"], list(state["last_launch"])
        # states saved before last_applied was kept: as then, every fragment counts as applied at its launch
        self.last_applied = list(state.get("last_applied", state["last_launch"]))

    def step(self):
        self.join()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.inner_step += 1
        n = self.inner_step % self.h
        for f in range(len(self.fragments)):
            if n == self.phase[f]:
                if f not in self.pending:  # no overlap: launch now, blocking
                    self._launch(f)
                self._finish(f)
        if self.overlap:
            for f in range(len(self.fragments)):
                if n == (self.phase[f] - self.overlap) % self.h:
                    self._launch(f)

    def later_device_bytes(self):
        """Bytes on the model's device that only the outer steps allocate, which a batch-size search before the
        first step must hold aside: the outer momentum when theta_global lives there, the codecs' error feedback
        (fp32, at most one vector of the fragment per buffer: a shard's is 1/K of it), and with overlap the
        exchange in flight (pseudo-gradient and result) while inner steps run."""
        owned = [sum(t.numel() for t in frag.theta) for frag in self.fragments]
        n = sum(4 * k * len(frag.codec.buffers) for frag, k in zip(self.fragments, owned))
        if self.device == self.comm_device and self.outer_optimizer.defaults.get("momentum", 0):
            n += 4 * sum(owned)
        if self.overlap:
            n += 8 * max(owned)
        return n

    def _launch(self, f):
        """Start fragment f's exchange: on the background thread when overlapping (one thread, so every
        rank issues the outer collectives in the same order), else inline."""
        t0 = time.perf_counter()
        self.pending[f] = self.fragments[f].launch(self.groups.outer, self.inner_step, self.executor, self.side_stream)
        self.last_launch[f] = self.inner_step
        if self.executor is None:
            self.wait_seconds += time.perf_counter() - t0

    def set_total_steps(self, steps):
        """The inner steps of the whole run (the stage's schedule), for --outer-final-average."""
        self.total_steps = steps

    @contextmanager
    def _outer_schedule(self, launched_at):
        """The outer optimizer's lr (and momentum) for the exchange launched at inner step `launched_at`."""
        scale, plain_average = 1.0, False
        if self.final_average:
            if self.total_steps is None:
                raise RuntimeError("--outer-final-average: the training script must call sync.set_total_steps(n)")
            plain_average = launched_at >= self.total_steps
        if self.lr_warmup:
            scale = min(1.0, launched_at / (self.lr_warmup * self.h))
        if scale == 1.0 and not plain_average:
            yield
            return
        groups = self.outer_optimizer.param_groups
        saved = [dict(g) for g in groups]
        for g in groups:
            g["lr"] = 1.0 if plain_average else g["lr"] * scale
            if plain_average and "momentum" in g:
                g["momentum"] = 0.0  # SGD then neither reads nor updates its momentum buffer
        try:
            yield
        finally:
            for g, old in zip(groups, saved):
                g.update({k: old[k] for k in ("lr", "momentum") if k in old})

    def _finish(self, f):
        frag = self.fragments[f]
        pending = self.pending.pop(f)
        with self._outer_schedule(pending.launched_at):
            self.wait_seconds += frag.finish(pending, self.outer_optimizer, self.alpha)
        self._share_within_worker(frag)
        self.last_applied[f] = self.inner_step
        self.num_syncs += 1

    def synchronize(self):
        """Finish the schedule (end of training): apply the exchanges in flight, then sync once more every
        fragment that took inner steps since its last exchange was applied, and leave theta_global in the model.

        The end-of-training rule, on purpose: a fragment with nothing new since its last exchange landed (with
        overlap, one whose exchange landed on the very last step) is left as it landed. Syncing it again would
        send a zero pseudo-gradient (alpha 0) or only the alpha-mixing residue, and the outer optimizer would
        turn that into a pure momentum step on the final weights. Without overlap an exchange lands on the
        step it is launched, so this is the former "steps since its last launch" rule, unchanged."""
        for f in sorted(self.pending):
            self._finish(f)  # applied now: nothing new since
        self.outer_step([f for f in range(len(self.fragments)) if self.last_applied[f] < self.inner_step])
        if self.alpha:  # alpha mixing left local weights in the model: the result is theta_global
            with torch.no_grad():
                for frag in self.fragments:
                    for theta, p in zip(frag.theta, frag.owned):
                        p.copy_(theta)
                    self._share_within_worker(frag)

    def outer_step(self, fragments=None):
        """Exchange and apply now, blocking, the given fragments (default: all of them)."""
        for f in range(len(self.fragments)) if fragments is None else fragments:
            self._launch(f)
            self._finish(f)

    @contextmanager
    def global_view(self):
        """Collective: inside, the model holds theta_global; afterwards this worker's own weights, exactly."""
        if self._backup is not None:  # nested
            yield
            return
        with torch.no_grad():
            self._backup = [p.detach().to(self.device, copy=True) for p in self.params]
            for frag in self.fragments:
                for theta, p in zip(frag.theta, frag.owned):
                    p.copy_(theta)
                self._share_within_worker(frag)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, self._backup):
                    p.copy_(saved)
            self._backup = None

    def _share_within_worker(self, frag):
        """Each rank broadcasts the pieces of `frag` it owns to the other ranks of its worker."""
        groups = self.groups
        if groups.ranks_per_worker == 1:
            return
        with torch.no_grad():
            for j in range(groups.ranks_per_worker):
                pieces = [p for p, o in zip(frag.pieces, frag.owners) if o == j]
                if not pieces:
                    continue
                flat = torch.cat([p.reshape(-1) for p in pieces])
                comm.broadcast(flat, src=groups.global_rank(groups.worker_id, j), group=groups.inner)
                offset = 0
                for p in pieces:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def state_dict(self):
        pending = {}
        for f, p in self.pending.items():  # drain: the results are saved, so a resume applies them on time
            t0 = time.perf_counter()
            result = p.future.result()
            self.wait_seconds += time.perf_counter() - t0
            if p.done_event is not None:
                torch.cuda.current_stream().wait_event(p.done_event)
            pending[f] = {"launched_at": p.launched_at, "result": None if result is None else result.cpu()}
        local = self._backup if self._backup is not None else self.params
        return {"mode": "diloco", "fragments": len(self.fragments), "h": self.h, "overlap": self.overlap,
                "theta_global": [[t.cpu() for t in frag.theta] for frag in self.fragments],
                "outer_optimizer": self.outer_optimizer.state_dict(),
                "codecs": [frag.codec.state_dict() for frag in self.fragments],
                "inner_step": self.inner_step, "last_launch": list(self.last_launch),
                "last_applied": list(self.last_applied), "pending": pending,
                "num_syncs": self.num_syncs, "wait_seconds": self.wait_seconds,
                "local_weights": [t.detach().cpu().clone() for t in local]}

    def _piece_names(self):
        """(parameter name, first row, end row) of every piece of every fragment, in order."""
        spans = {}
        for name, p in self.model.named_parameters():
            spans[p.data_ptr()] = (name, p)
        out = []
        for frag in self.fragments:
            names = []
            for piece in frag.pieces:
                base = next((v for k, v in spans.items() if k <= piece.data_ptr() < k + v[1].numel() * v[1].element_size()))
                name, p = base
                per_row = max(1, p.numel() // max(p.shape[0] if p.dim() else 1, 1))
                lo = (piece.data_ptr() - p.data_ptr()) // p.element_size() // per_row
                names.append((name, lo, lo + (piece.shape[0] if piece.dim() else 1)))
            out.append(names)
        return out

    def portable_state_dict(self):
        """Collective inside worker 0. theta_global and the outer optimizer's per-element state (the momentum)
        by parameter name, whole tensors, and the step counters: what a run with another number of workers
        or ranks per worker resumes from. Every worker holds the same outer state, so worker 0's ranks send
        their owned pieces to rank 0 over the worker's own group (nothing crosses the link between workers),
        which returns the assembled dict (other ranks return None)."""
        if self.pending:  # the same on every rank (the schedule is global): no rank enters the gather
            return {"mode": "diloco", "in_flight": sorted(self.pending)}
        pieces = []
        if self.groups.worker_id == 0:
            for frag, names in zip(self.fragments, self._piece_names()):
                owned = [n for n, o in zip(names, frag.owners) if o == self.groups.local_index]
                for (name, lo, hi), theta in zip(owned, frag.theta, strict=True):
                    state = self.outer_optimizer.state.get(theta, {})
                    per_element = {k: v.cpu() for k, v in state.items() if torch.is_tensor(v) and v.shape == theta.shape}
                    scalars = {k: v for k, v in state.items() if k not in per_element}
                    pieces.append((name, lo, hi, theta.cpu(), per_element, scalars))
        if self.groups.worker_id != 0:
            return None  # every worker holds the same outer state: nothing crosses the slow link for a save
        if self.groups.ranks_per_worker > 1:  # gathered inside worker 0 only (its fast links)
            first = self.groups.global_rank(0, 0)
            gathered = [None] * self.groups.ranks_per_worker if self.groups.local_index == 0 else None
            dist.gather_object(pieces, gathered, dst=first, group=self.groups.inner)
            if self.groups.local_index != 0:
                return None
            pieces = [piece for rank_pieces in gathered for piece in rank_pieces]
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        theta_global, outer_state, scalars = {}, {}, {}
        for name, lo, hi, theta, per_element, piece_scalars in pieces:
            full = theta_global.setdefault(name, torch.zeros(shapes[name], dtype=torch.float32))
            full.view(-1, *full.shape[1:])[lo:hi] = theta.view(-1, *full.shape[1:]) if full.dim() else theta
            for key, value in per_element.items():
                buf = outer_state.setdefault(key, {}).setdefault(name, torch.zeros(shapes[name], dtype=torch.float32))
                buf.view(-1, *buf.shape[1:])[lo:hi] = value.view(-1, *buf.shape[1:]) if buf.dim() else value
            scalars.update(piece_scalars)
        return {"mode": "diloco", "h": self.h, "fragments": len(self.fragments), "theta_global": theta_global,
                "outer_state": outer_state, "outer_scalars": scalars, "inner_step": self.inner_step,
                "last_launch": list(self.last_launch), "last_applied": list(self.last_applied),
                "num_syncs": self.num_syncs}

    def load_portable_state_dict(self, state):
        """Continue from a portable state (any number of workers and ranks): theta_global and the outer
        momentum from it; this worker's own weights = theta_global (its drift since the last outer step was
        not kept); codec error feedback starts at zero. A DDP state starts the outer loop fresh."""
        if not state or state.get("mode") != "diloco":
            return
        if "in_flight" in state:
            raise ValueError("this checkpoint was saved with outer exchanges in flight (--diloco-overlap), which only "
                             "a resume with the same ranks and workers can finish; resume with the same layout, or "
                             "from a checkpoint at a step where no exchange is in flight")
        if (state["fragments"], state["h"]) != (len(self.fragments), self.h):
            raise ValueError(f"checkpoint was saved with --diloco-fragments {state['fragments']} --diloco-h "
                             f"{state['h']}: resume with the same flags")
        with torch.no_grad():
            for frag, names in zip(self.fragments, self._piece_names()):
                for (name, lo, hi), piece in zip(names, frag.pieces):
                    full = state["theta_global"][name]
                    piece.copy_(full.view(-1, *full.shape[1:])[lo:hi].view_as(piece) if full.dim() else full)
                owned = [n for n, o in zip(names, frag.owners) if o == self.groups.local_index]
                for (name, lo, hi), theta in zip(owned, frag.theta, strict=True):
                    full = state["theta_global"][name]
                    theta.copy_(full.view(-1, *full.shape[1:])[lo:hi].view_as(theta) if full.dim() else full)
                    entry = dict(state["outer_scalars"])
                    for key, by_name in state["outer_state"].items():
                        buf = by_name.get(name)  # absent: this fragment had no outer step yet
                        if buf is None:
                            continue
                        entry[key] = (buf.view(-1, *buf.shape[1:])[lo:hi].view_as(theta) if buf.dim() else buf).to(theta.device, copy=True)
                    if entry:
                        self.outer_optimizer.state[theta] = entry
        self._load_counters(state)
        self.num_syncs, self.pending = state["num_syncs"], {}

    def load_state_dict(self, state):
        """Restore a DiLoCo state; a DDP checkpoint (or none) starts the outer loop fresh from the weights."""
        if not state or state.get("mode") != "diloco":
            return
        if "inner_step" not in state:
            raise ValueError("this checkpoint's DiLoCo state predates exact resume (no worker weights saved): "
                             "it cannot be resumed; start the stage again without --resume")
        if (state["fragments"], state["h"], state["overlap"]) != (len(self.fragments), self.h, self.overlap):
            raise ValueError(f"checkpoint was saved with --diloco-fragments {state['fragments']} --diloco-h "
                             f"{state['h']} --diloco-overlap {state['overlap']}: resume with the same flags")
        with torch.no_grad():
            for frag, saved in zip(self.fragments, state["theta_global"], strict=True):
                for theta, t in zip(frag.theta, saved, strict=True):
                    theta.copy_(t)
            for p, t in zip(self.params, state["local_weights"], strict=True):
                p.copy_(t)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        for frag, codec_state in zip(self.fragments, state["codecs"], strict=True):
            frag.codec.load_state_dict(codec_state)
        self._load_counters(state)
        self.num_syncs, self.wait_seconds = state["num_syncs"], state["wait_seconds"]
        self.pending = {}
        for f, saved in state["pending"].items():
            future = Future()
            future.set_result(None if saved["result"] is None else saved["result"].to(self.device))
            self.pending[f] = Pending(future, saved["launched_at"])


def default_outer_optimizer(config):
    """params -> SGD from the config's outer_* values; momentum 0 when the codec keeps the momentum itself, as dct
    and sparseloco do: their workers' decayed error feedback is the momentum, and the outer step is theta -= lr * mean."""
    momentum = 0.0 if CODECS[config.codec.name].owns_momentum else config.outer_momentum
    nesterov = config.outer_nesterov and momentum > 0
    return lambda params: torch.optim.SGD(params, lr=config.outer_lr, momentum=momentum, nesterov=nesterov)


def make_sync(config, model, optimizers, groups, outer_optimizer=None):
    """DDPSync or DiLoCoSync for a SyncConfig. outer_optimizer: params -> Optimizer (default_outer_optimizer)."""
    if config.comm_delay_s:
        comm.set_comm_delay("inner" if config.mode == "ddp" else "outer", config.comm_delay_s)
    if config.mode == "ddp":
        return DDPSync(model, optimizers, groups)
    return DiLoCoSync(model, optimizers, groups, config, outer_optimizer=outer_optimizer)


def _torchft_membership(config, state_fn, load_fn, model):
    """A torchft Manager for this rank (config.elastic: an ElasticConfig), on the worker's own store (torchrun's, or one
    made here for a single process), meeting the other workers at the Lighthouse."""
    elastic = config.elastic
    lighthouse = elastic.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not lighthouse:
        raise UsageError("--elastic torchft: no Lighthouse; start one (`torchft_lighthouse --min_replicas 1 "
                         "--join_timeout_ms 10000`) and pass --lighthouse http://HOST:29510")
    _, rank, _, world_size = get_dist_info()
    store_addr = store_port = None
    if not (dist.is_available() and dist.is_initialized()):
        store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
        _torchft_membership.store = store  # kept alive with the process
        store_addr, store_port = "127.0.0.1", store.port
    return TorchftMembership(state_fn, load_fn, elastic.replica_id, lighthouse, elastic.min_workers,
                             config.collective_timeout, next(model.parameters()).device, elastic.max_outer_retries,
                             rank=rank, world_size=world_size, store_addr=store_addr, store_port=store_port,
                             peer_timeout_s=elastic.peer_timeout, link_mbps=elastic.link_mbps)
