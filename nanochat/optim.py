"""Muon and AdamW, local or data-parallel over any process group.

With a group of size > 1 (process_group=None means the world once torch.distributed is initialised) each
step first averages the gradients over the group with ONE flat all-reduce (nanochat.comm, counted), then
updates locally, so every rank holds the same parameters and optimizer state and the step equals the
local optimizer's on the global batch. An all-reduce rather than nanochat's reduce-scatter + all-gather:
gloo (CPU) has no reduce_scatter, and one code path for CPU and GPU is simpler; the cost is that each rank
computes the whole update instead of its shard. A group of size 1 never communicates.
"""

from collections import defaultdict

import torch

from nanochat.comm import flat_all_reduce_mean


def _averaged_grads(optimizer):
    """Every parameter's gradient, averaged in place over the optimizer's process group."""
    grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                raise RuntimeError(f"{type(optimizer).__name__}.step: a parameter of shape {tuple(p.shape)} has no "
                                   "gradient; every parameter must take part in the loss before step()")
            grads.append(p.grad)
    flat_all_reduce_mean(grads, optimizer.process_group)
    return grads


def zeropower_via_newtonschulz5(G, steps):
    """Approximately orthogonalise G (..., m, n): push its singular values towards 1 with a quintic
    Newton-Schulz iteration whose coefficients favour speed over exactness (they land in roughly [0.7, 1.2]).
    bf16 on CUDA (fast, and the result is only a direction); fp32 elsewhere (deterministic)."""
    assert G.ndim >= 2
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    wide = X.size(-2) <= X.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


# Polar Express (Amsel et al., arXiv 2505.16932): one (a, b, c) per iteration, chosen for 5 iterations with
# safety factor 2e-2 and cushion 2, so each step pushes singular values towards 1 as far as is safe.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, steps):
    """Orthogonalise G (..., m, n) as zeropower_via_newtonschulz5 does, with per-iteration coefficients that
    converge closer to the polar factor in the same number of matrix products."""
    assert G.ndim >= 2 and steps <= len(POLAR_EXPRESS)
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # the coefficients assume a norm just below 1
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


ORTHO = {"ns5": zeropower_via_newtonschulz5, "polar": polar_express}


def normalized_per_neuron(U, buf, beta2):
    """NorMuon (arXiv 2510.05491): an orthogonalised update's rows (columns, for a wide matrix) come out with
    uneven scales; divide each by the square root of a running mean of its squared entries (`buf`, updated in
    place), then rescale so the whole update keeps its Frobenius norm. U: (n, rows, cols)."""
    dim = -1 if U.size(-2) >= U.size(-1) else -2  # average along the short side: one statistic per neuron
    U = U.float()  # one copy (bf16 on CUDA), not one per use
    sq = U.square().mean(dim=dim, keepdim=True)
    buf.lerp_(sq, 1 - beta2)
    scaled = U * buf.clamp_min(1e-10).rsqrt()
    norm_before = U.norm(dim=(-2, -1), keepdim=True)
    return scaled * (norm_before / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def _add_scaled_(xs, ys, scale):
    """xs[i] += scale * ys[i]. A Python scale goes in as alpha (one fused multiply-add, as Muon always did); a 0-d
    tensor (the compiled step's scalars: a float alpha would be baked into the graph) as a multiply."""
    if isinstance(scale, torch.Tensor):
        torch._foreach_add_(xs, [y * scale for y in ys])  # a plain multiply takes a CPU scalar tensor
    else:
        torch._foreach_add_(xs, ys, alpha=scale)


def muon_shape_group_step(params, grads, momentum_buffer, second_momentum, lr, weight_decay, momentum, beta2,
                          nesterov, ortho, ns_steps):
    """One Muon step for n same-shape matrices, one function so that torch.compile makes it one fused step per
    shape group. params, grads: lists of n (rows, cols) tensors; momentum_buffer (n, rows, cols) and
    second_momentum (NorMuon's (n, rows, 1) or (n, 1, cols); None without it) are updated in place. lr (already
    scaled for the shape), weight_decay (None: none), momentum, beta2 (None: no NorMuon): Python floats, or 0-d
    tensors when compiled, so that a changing schedule does not recompile."""
    update = torch.stack(grads)  # the step's one copy of the gradients (fused into the lerps when compiled)
    momentum_buffer.lerp_(update, 1 - momentum)
    if nesterov:
        update.lerp_(momentum_buffer, momentum)  # in place on the copy: no further allocation
    else:
        update = momentum_buffer  # orthogonalisation reads it and never writes it
    u = ORTHO[ortho](update, ns_steps)
    if beta2 is not None:
        u = normalized_per_neuron(u, second_momentum, beta2)
    us = list(u.to(params[0].dtype).unbind(0))
    if weight_decay is not None:  # cautious: only where the update and the weight agree in sign
        _add_scaled_(params, [p * ((u_p * p) >= 0) for p, u_p in zip(params, us)], -lr * weight_decay)
    _add_scaled_(params, us, -lr)


_compiled_step = None


def _group_step(compile):
    """muon_shape_group_step, wrapped by torch.compile once per process when asked (its cache then holds one graph
    per shape group)."""
    global _compiled_step
    if not compile:
        return muon_shape_group_step
    if _compiled_step is None:
        _compiled_step = torch.compile(muon_shape_group_step, dynamic=False, fullgraph=True)
    return _compiled_step


class Muon(torch.optim.Optimizer):
    """Nesterov momentum SGD whose update for each matrix is orthogonalised and scaled by
    sqrt(max(1, rows/cols)). For 2D parameters only.
    ortho: "ns5" (the quintic Newton-Schulz of nanochat's first release) or "polar" (Polar Express).
    beta2: None, or NorMuon's per-neuron normalisation with this running-average coefficient.
    weight_decay: cautious decoupled decay, p -= lr * wd * p only where the update and p agree in sign.

    State is kept stacked per shape group, one (n, rows, cols) momentum tensor and one NorMuon tensor, updated in
    place; each parameter's state["momentum_buffer"] / ["second_momentum"] is a view (a slice) of them, so
    state_dict() keeps the per-parameter format of earlier versions and either version loads the other's.
    compile: torch.compile the per-shape-group step; None (the default) does when the parameters are on CUDA."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ortho="ns5", beta2=None,
                 weight_decay=0.0, process_group=None, compile=None):
        if ortho not in ORTHO:
            raise ValueError(f"Muon ortho must be one of {sorted(ORTHO)}, not {ortho!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ortho=ortho,
                                      beta2=beta2, weight_decay=weight_decay))
        self.process_group, self.compile = process_group, compile
        self._stacks = {}

    def __setstate__(self, state):  # also the end of load_state_dict: the loaded per-parameter state restacks
        super().__setstate__(state)
        self._stacks = {}

    def _stacked(self, params, key, fresh):
        """The (n, ...) tensor whose slices are these parameters' state[key]. Stacked again only when an entry is
        missing or is no longer our slice (the first step, after load_state_dict or a replaced entry): once,
        not every step."""
        cache_key = (key, tuple(map(id, params)))
        stack, views = self._stacks.get(cache_key, (None, ()))
        if stack is None or any(self.state[p].get(key) is not v for p, v in zip(params, views)):
            stack = torch.stack([self.state[p][key] if key in self.state[p] else fresh(p) for p in params])
            views = stack.unbind(0)
            for p, v in zip(params, views):
                self.state[p][key] = v
            self._stacks[cache_key] = (stack, views)
        return stack

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        _averaged_grads(self)
        for group in self.param_groups:
            by_shape = defaultdict(list)  # same-shape matrices are orthogonalised as one batch
            for p in group["params"]:
                by_shape[p.shape].append(p)
            beta2 = group.get("beta2")  # .get: optimizer states saved before these options existed load without them
            for shape, params in by_shape.items():
                momentum_buffer = self._stacked(params, "momentum_buffer", lambda p: torch.zeros_like(p.grad))
                second_momentum = None
                if beta2 is not None:
                    side = (shape[-2], 1) if shape[-2] >= shape[-1] else (1, shape[-1])
                    second_momentum = self._stacked(params, "second_momentum",
                                                    lambda p: torch.zeros(side, device=p.device, dtype=torch.float32))
                compile = self.compile if self.compile is not None else params[0].is_cuda
                scalar = (lambda x: torch.tensor(x, dtype=torch.float32)) if compile else (lambda x: x)
                wd = group.get("weight_decay", 0.0)
                _group_step(compile)(params, [p.grad for p in params], momentum_buffer, second_momentum,
                                     scalar(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5),
                                     scalar(wd) if wd else None, scalar(group["momentum"]),
                                     None if beta2 is None else scalar(beta2), group["nesterov"],
                                     group.get("ortho", "ns5"), group["ns_steps"])


class AdamW(torch.optim.Optimizer):
    """Adam with bias correction and decoupled weight decay (p *= 1 - lr * wd)."""

    def __init__(self, param_groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, process_group=None):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.process_group = process_group

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        _averaged_grads(self)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            # multi-tensor kernels over the parameters that share a step count (all of a group, but for one
            # added later), a device and a dtype: per parameter, the same arithmetic as one at a time
            batches = defaultdict(list)
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                batches[(state["step"], p.device, p.dtype)].append(p)
            for (t, _, _), params in batches.items():
                ms = [self.state[p]["exp_avg"] for p in params]
                vs = [self.state[p]["exp_avg_sq"] for p in params]
                grads = [p.grad for p in params]
                torch._foreach_lerp_(ms, grads, 1 - beta1)
                torch._foreach_lerp_(vs, torch._foreach_mul(grads, grads), 1 - beta2)
                denoms = torch._foreach_div(vs, 1 - beta2 ** t)
                torch._foreach_sqrt_(denoms)
                torch._foreach_add_(denoms, eps)
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_addcdiv_(params, ms, denoms, value=-lr / (1 - beta1 ** t))
