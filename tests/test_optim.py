import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist

from nanochat.comm import comm_stats, label_group, reset_comm_stats
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import AdamW, Muon, normalized_per_neuron, polar_express, zeropower_via_newtonschulz5
from nanochat.train_loop import lr_multiplier, muon_momentum, set_schedule
from tests.dist_utils import run_distributed

torch.set_num_threads(1)

CONFIG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
STEPS, BATCH = 5, 4


def build(seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    model.init_weights()
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, CONFIG.vocab_size, (STEPS, BATCH, CONFIG.sequence_len), generator=g)
    y = torch.randint(0, CONFIG.vocab_size, (STEPS, BATCH, CONFIG.sequence_len), generator=g)
    return list(zip(x, y))


def train_step(model, optimizers, x, y):
    model(x, y).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def numel(opt):
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def _worker(rank, world_size, tmpdir):
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    data = batches()

    # data parallel over the world (process_group=None): each rank sees half of every global batch
    model = build()
    adamw, muon = model.setup_optimizers()
    reset_comm_stats()
    for x, y in data:
        model(x[half], y[half]).backward()
        for opt in (adamw, muon):
            before = comm_stats().get("world", {"bytes": 0, "calls": 0})
            opt.step()
            after = comm_stats()["world"]
            # one flat fp32 bucket holding every gradient of this optimizer
            assert after["calls"] - before["calls"] == 1
            assert after["bytes"] - before["bytes"] == 4 * numel(opt)
        model.zero_grad(set_to_none=True)
    torch.save({"model": model.state_dict(), "adamw": adamw.state_dict(), "muon": muon.state_dict()},
               os.path.join(tmpdir, f"dist{rank}.pt"))

    # a group of size 1 (a DiLoCo worker of one rank) never communicates
    singles = [dist.new_group([0]), dist.new_group([1])]
    mine = singles[rank]
    label_group(mine, "inner")
    model = build()
    optimizers = model.setup_optimizers(process_group=mine)
    reset_comm_stats()
    for x, y in data[:2]:
        train_step(model, optimizers, x[half], y[half])
    assert comm_stats() == {}
    torch.save(model.state_dict(), os.path.join(tmpdir, f"single{rank}.pt"))


def max_diff(a, b):
    """Max abs difference over nested dicts/lists of tensors (exact match required for everything else)."""
    if isinstance(a, torch.Tensor):
        return (a.float() - b.float()).abs().max().item()
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        return max([max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    assert a == b
    return 0.0


def test_distributed_equals_local(tmp_path):
    run_distributed(_worker, 2, tmp_path, str(tmp_path))
    data = batches()

    model = build()
    adamw, muon = model.setup_optimizers()  # no process group initialised here: purely local
    for x, y in data:
        train_step(model, (adamw, muon), x, y)
    local = {"model": model.state_dict(), "adamw": adamw.state_dict(), "muon": muon.state_dict()}
    ranks = [torch.load(tmp_path / f"dist{r}.pt") for r in range(2)]
    # both ranks applied the same averaged gradients: identical to the bit
    assert max_diff(ranks[0], ranks[1]) == 0.0
    # equal to the local optimizer on the global batch up to fp32 summation order. Measured max abs diffs
    # after 5 steps: embedding 9.2e-6 (entries up to 6.2; AdamW at lr 0.2 * (32/768)^-0.5 = 0.98 passes the
    # ~1e-7 relative gradient noise straight into the step), other weights 1.2e-7, optimizer states 1.3e-9
    # (1.7e-8 on an AMD EPYC machine, whose fp32 kernels sum in another order).
    wte = "transformer.wte.weight"
    assert max_diff(ranks[0]["model"][wte], local["model"][wte]) < 2e-5
    assert max_diff({k: v for k, v in ranks[0]["model"].items() if k != wte},
                    {k: v for k, v in local["model"].items() if k != wte}) < 1e-6
    assert max_diff([ranks[0]["adamw"], ranks[0]["muon"]], [local["adamw"], local["muon"]]) < 5e-8
    assert max_diff(ranks[0]["model"], build().state_dict()) > 1e-3  # and training did move the weights

    # the size-1 groups behaved exactly like a lone process on that rank's half batch
    for r in range(2):
        half = slice(r * BATCH // 2, (r + 1) * BATCH // 2)
        model = build()
        optimizers = model.setup_optimizers()
        for x, y in data[:2]:
            train_step(model, optimizers, x[half], y[half])
        assert max_diff(torch.load(tmp_path / f"single{r}.pt"), model.state_dict()) == 0.0


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 384)])
def test_newton_schulz_singular_values(shape):
    """Quintic NS is tuned for speed, not exactness: singular values land in a band around 1 (measured
    [0.682, 1.134] for random Gaussian matrices) instead of exactly 1."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.65 and s.max() < 1.2, (s.min(), s.max())
    # same singular vectors as G: X ~ U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((U @ Vh).flatten(), X.flatten(), dim=0)
    assert cos > 0.98
    # batched call orthogonalises each matrix on its own
    torch.testing.assert_close(zeropower_via_newtonschulz5(torch.stack([G, 3 * G]), 5)[1], X, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_polar_express_lands_closer_to_orthogonal_than_quintic_ns(shape):
    """Same 5 iterations, same matrix products: singular values measured in [0.859, 1.142] against NS's
    [0.682, 1.134], along the same singular vectors."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = polar_express(G, steps=5)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.85 and s.max() < 1.15, (s.min(), s.max())
    assert s.min() > torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5)).min() + 0.15
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((U @ Vh).flatten(), X.flatten(), dim=0) > 0.99


def test_normuon_evens_out_neurons_and_keeps_the_norm():
    """Rows of very different scale come out of the normalisation with equal norms (first step from a zero
    buffer: the running mean is (1 - beta2) x that row's mean square), the whole update keeps its norm."""
    U = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9.0).view(1, 8, 1)
    buf = torch.zeros(1, 8, 1)
    out = normalized_per_neuron(U, buf, beta2=0.9)
    torch.testing.assert_close(buf, 0.1 * U.square().mean(-1, keepdim=True))
    row_norms = out.norm(dim=-1)
    torch.testing.assert_close(row_norms, row_norms.mean().expand_as(row_norms), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(), U.norm(), rtol=1e-5, atol=1e-6)
    # a wide matrix is normalised per column
    wide = normalized_per_neuron(U.mT, torch.zeros(1, 1, 8), beta2=0.9)
    torch.testing.assert_close(wide, out.mT)


def test_muon_cautious_weight_decay_known_answer_and_neutral_knobs_are_the_old_step():
    g = torch.Generator().manual_seed(0)
    p0, grad = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    plain, decayed, neutral = (torch.nn.Parameter(p0.clone()) for _ in range(3))
    for p in (plain, decayed, neutral):
        p.grad = grad.clone()
    Muon([plain], lr=0.1, momentum=0.9).step()
    Muon([decayed], lr=0.1, momentum=0.9, weight_decay=0.5).step()
    Muon([neutral], lr=0.1, momentum=0.9, ortho="ns5", beta2=None, weight_decay=0.0).step()
    assert torch.equal(neutral, plain)
    lr = 0.1 * 2 ** 0.5  # tall: lr scaled by sqrt(32/16)
    u = (p0 - plain.detach()) / lr  # the orthogonalised update
    agree = (u * p0) >= 0  # decay only where the update already pulls the weight towards zero
    expected = plain.detach() - lr * 0.5 * p0 * agree
    torch.testing.assert_close(decayed.detach(), expected, rtol=1e-6, atol=1e-6)
    assert 0 < agree.float().mean() < 1


def test_schedules_known_values():
    assert [lr_multiplier(s, 10, 0.0, 0.2, 0.0) for s in (0, 8, 9, 10)] == [1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(0, 10, 0.2) == 0.5 and lr_multiplier(10, 10, 0.0, 0.5, 0.05) == pytest.approx(0.05)
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.90) and muon_momentum(900) == 0.95
    # with a warmdown: the warmed-up value at its start, falling linearly to 0.90 at the end
    assert muon_momentum(600, 1000, 0.4, peak=0.97) == pytest.approx(0.97)
    assert muon_momentum(800, 1000, 0.4, peak=0.97) == pytest.approx(0.935)
    assert muon_momentum(1000, 1000, 0.4, peak=0.97) == pytest.approx(0.90)
    assert muon_momentum(10, 20, 0.5, peak=0.97) == pytest.approx(0.85 + 0.12 * 10 / 300)  # short runs: no jump
    model = build()
    adamw, muon = model.setup_optimizers(weight_decay=0.1, muon_weight_decay=0.2)
    set_schedule([adamw, muon], 0.5, momentum=0.9, wd_frac=0.25)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.05) and muon.param_groups[0]["momentum"] == 0.9
    assert adamw.param_groups[0]["weight_decay"] == 0.1  # AdamW's decay is not scheduled
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)


def test_muon_step_known_answer():
    """One Nesterov step from zero momentum: update = NS((1 - m) g + m (1 - m) g) scaled by sqrt(rows/cols)."""
    g = torch.Generator().manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(128, 32, generator=g))
    wide = torch.nn.Parameter(torch.randn(32, 128, generator=g))
    tall.grad, wide.grad = torch.randn(128, 32, generator=g), torch.randn(32, 128, generator=g)
    p0 = [tall.detach().clone(), wide.detach().clone()]
    Muon([tall, wide], lr=0.1, momentum=0.9).step()
    for p, before, factor in ((tall, p0[0], 2.0), (wide, p0[1], 1.0)):  # sqrt(128 / 32) = 2 for the tall one
        nesterov = (0.1 + 0.9 * 0.1) * p.grad
        expected = before - 0.1 * factor * zeropower_via_newtonschulz5(nesterov, 5)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(10, 7, generator=g)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = AdamW([dict(params=[ours], lr=0.01)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(10):
        grad = torch.randn(10, 7, generator=g)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"])


def test_state_dict_resume_is_exact():
    data = batches()
    model = build()
    optimizers = model.setup_optimizers(weight_decay=0.1)
    for x, y in data[:3]:
        train_step(model, optimizers, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]}, buf)
    for x, y in data[3:]:
        train_step(model, optimizers, x, y)

    buf.seek(0)
    saved = torch.load(buf)
    resumed = build(seed=123)  # different weights, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opts = resumed.setup_optimizers(weight_decay=0.1)
    for opt, state in zip(resumed_opts, saved["optim"]):
        opt.load_state_dict(state)
    for x, y in data[3:]:
        train_step(resumed, resumed_opts, x, y)
    for (k, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert max_diff([o.state_dict() for o in optimizers], [o.state_dict() for o in resumed_opts]) == 0.0


def test_missing_grad_is_a_clear_error():
    model = build()
    adamw, muon = model.setup_optimizers()
    x = torch.zeros(1, 4, dtype=torch.long)
    model(x, x).backward()
    model.lm_head.weight.grad = None
    with pytest.raises(RuntimeError, match=r"AdamW.step: a parameter of shape \(64, 32\) has no gradient"):
        adamw.step()
    muon.step()  # its parameters all have gradients


class _OldMuon(torch.optim.Optimizer):
    """Reference: Muon.step as it was before its multi-tensor rewrite (one parameter at a time, NorMuon state
    stacked and copied back every step), kept here so the rewrite can be held to it exactly."""

    def __init__(self, params, lr, momentum, nesterov, ortho, beta2, weight_decay, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ortho=ortho,
                                      beta2=beta2, weight_decay=weight_decay))

    @staticmethod
    def _normalized_per_neuron(U, buf, beta2):
        dim = -1 if U.size(-2) >= U.size(-1) else -2
        sq = U.float().square().mean(dim=dim, keepdim=True)
        buf.lerp_(sq, 1 - beta2)
        scaled = U.float() * buf.clamp_min(1e-10).rsqrt()
        norm_before = U.float().norm(dim=(-2, -1), keepdim=True)
        return scaled * (norm_before / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

    @torch.no_grad()
    def step(self):
        ortho_fn = {"ns5": zeropower_via_newtonschulz5, "polar": polar_express}
        for group in self.param_groups:
            momentum = group["momentum"]
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                updates = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - momentum)
                    updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
                ortho = ortho_fn[group["ortho"]](torch.stack(updates), group["ns_steps"])
                if group["beta2"] is not None:
                    for p in params:
                        if "second_momentum" not in self.state[p]:
                            side = (shape[-2], 1) if shape[-2] >= shape[-1] else (1, shape[-1])
                            self.state[p]["second_momentum"] = torch.zeros(side, dtype=torch.float32)
                    bufs = torch.stack([self.state[p]["second_momentum"] for p in params])
                    ortho = self._normalized_per_neuron(ortho, bufs, group["beta2"])
                    for p, b in zip(params, bufs):
                        self.state[p]["second_momentum"].copy_(b)
                lr = group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5
                wd = group["weight_decay"]
                for p, u in zip(params, ortho):
                    u = u.to(p.dtype)
                    if wd:
                        p.sub_(p * ((u * p) >= 0), alpha=lr * wd)
                    p.add_(u, alpha=-lr)


class _OldAdamW(torch.optim.Optimizer):
    """Reference: AdamW.step as it was before its multi-tensor rewrite (one parameter at a time)."""

    def __init__(self, param_groups, betas, eps, weight_decay, lr=1e-3):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v, g = state["step"], state["exp_avg"], state["exp_avg_sq"], p.grad
                m.lerp_(g, 1 - beta1)
                v.lerp_(g.square(), 1 - beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                if wd:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def _twin_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    inits = [torch.randn(shape, generator=g) for shape in shapes]
    return [torch.nn.Parameter(t.clone()) for t in inits], [torch.nn.Parameter(t.clone()) for t in inits]


def _same_grads(a, b, g):
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()


MUON_SHAPES = [(24, 8), (8, 24), (24, 8), (16, 16), (8, 24), (24, 8)]  # three shape groups: tall, wide, square


def _muon_steps(opts, params, g, steps, start=0):
    """`steps` steps of every optimizer in opts on the same random gradients, under a schedule that moves lr,
    momentum and weight decay every step (as base_train's does)."""
    for i in range(start, start + steps):
        grads = [torch.randn(p.shape, generator=g) for p in params[0]]
        for opt, ps in zip(opts, params):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            group = opt.param_groups[0]
            group.update(lr=0.05 * (1 - i / 10), momentum=0.85 + 0.02 * i,
                         weight_decay=group["initial_weight_decay"] * (1 - i / 10))
            opt.step()


def _assert_same_muon(opt, ours, ref_opt, ref):
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("beta2", [None, 0.9])
@pytest.mark.parametrize("ortho", ["ns5", "polar"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_stacked_step_equals_the_per_parameter_step_exactly(nesterov, ortho, beta2, weight_decay):
    """Every option, five steps under a moving schedule: parameters and state equal to the bit."""
    ours, ref = _twin_params(MUON_SHAPES, seed=0)
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, ortho=ortho, beta2=beta2, weight_decay=weight_decay)
    opt, ref_opt = Muon(ours, **kw), _OldMuon(ref, **kw)
    for o in (opt, ref_opt):
        o.param_groups[0]["initial_weight_decay"] = weight_decay
    _muon_steps([opt, ref_opt], [ours, ref], torch.Generator().manual_seed(1), 5)
    _assert_same_muon(opt, ours, ref_opt, ref)
    assert not torch.equal(ours[0], _twin_params(MUON_SHAPES, seed=0)[0][0])  # and the steps did move the weights


@pytest.mark.parametrize("old_saves", [True, False])
def test_muon_state_dicts_load_across_the_per_parameter_and_stacked_versions_and_continue_exactly(old_saves):
    """A checkpoint of the per-parameter optimizer (separate tensors per parameter) loads into the stacked one and
    continues exactly as the per-parameter one would, and the stacked one's checkpoint loads into the old one."""
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, ortho="polar", beta2=0.9, weight_decay=0.1)
    make = [lambda ps: _OldMuon(ps, **kw), lambda ps: Muon(ps, **kw)]
    saver, loader = (make[0], make[1]) if old_saves else (make[1], make[0])
    g = torch.Generator().manual_seed(1)
    ours, ref = _twin_params(MUON_SHAPES, seed=0)
    first = saver(ours)
    first.param_groups[0]["initial_weight_decay"] = 0.1
    _muon_steps([first], [ours], g, 2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        for p, q in zip(ours, ref):
            q.copy_(p)
    second = loader(ref)
    second.load_state_dict(torch.load(buf))
    _muon_steps([first, second], [ours, ref], g, 3, start=2)
    _assert_same_muon(first, ours, second, ref)


def test_muon_keeps_its_state_stacked_and_steps_it_in_place():
    """After the first step each parameter's state is a slice of one tensor per shape group, and later steps update
    those same tensors where they are: no per-step stack or copy back. A replaced entry (load_state_dict, or a user
    resetting a buffer) is taken up at the next step."""
    params, _ = _twin_params(MUON_SHAPES, seed=0)
    opt = Muon(params, lr=0.05, momentum=0.9, beta2=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    keys = ("momentum_buffer", "second_momentum")
    before = {(i, k): (opt.state[p][k], opt.state[p][k].data_ptr()) for i, p in enumerate(params) for k in keys}
    for k in keys:
        for group in ([0, 2, 5], [1, 4], [3]):  # the shape groups
            storages = {opt.state[params[i]][k].untyped_storage().data_ptr() for i in group}
            assert len(storages) == 1, k  # one stacked tensor per shape group
            assert [opt.state[params[i]][k].storage_offset() for i in group] == \
                [j * opt.state[params[group[0]]][k].numel() for j in range(len(group))]
    opt.step()
    for (i, k), (tensor, ptr) in before.items():
        assert opt.state[params[i]][k] is tensor and tensor.data_ptr() == ptr
    assert torch.equal(opt.state[params[0]]["momentum_buffer"], torch.full((24, 8), 0.19))  # 0.1 then 0.1 + 0.9 * 0.1
    opt.state[params[0]]["momentum_buffer"] = torch.zeros(24, 8)
    opt.step()
    assert torch.equal(opt.state[params[0]]["momentum_buffer"], torch.full((24, 8), 0.1))
    assert torch.equal(opt.state[params[2]]["momentum_buffer"], torch.full((24, 8), 0.271))
    assert opt.state[params[0]]["momentum_buffer"].untyped_storage().data_ptr() == \
        opt.state[params[2]]["momentum_buffer"].untyped_storage().data_ptr()


def test_adamw_multi_tensor_step_equals_the_per_parameter_step_exactly():
    """Two groups (their own lr, betas, decay) and a third added after two steps, so parameters at different
    step counts (bias corrections) are updated in the same step()."""
    ours, ref = _twin_params([(10, 7), (7,), (3, 4, 5), (10, 7), (1,), (6, 2)], seed=2)
    groups = lambda ps: [dict(params=ps[:3], lr=0.01), dict(params=ps[3:5], lr=0.2, betas=(0.9, 0.99), weight_decay=0.0)]
    opt = AdamW(groups(ours), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref_opt = _OldAdamW(groups(ref), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        if step == 2:
            opt.add_param_group(dict(params=ours[5:], lr=0.05))
            ref_opt.add_param_group(dict(params=ref[5:], lr=0.05))
        n = 6 if step >= 2 else 5
        _same_grads(ours[:n], ref[:n], g)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
        assert opt.state[p]["step"] == ref_opt.state[q]["step"]


def test_train_steps_hands_on_step_the_optimizer_step_time_alone(monkeypatch):
    """opt_dt is sync.step()'s time on the host clock (CPU), not the micro-steps' or the schedule's: a fake clock
    moves 1 s per micro-step, 0.5 s in the schedule and 0.25 s (0.75 s at the second step) inside sync.step()."""
    from types import SimpleNamespace

    from nanochat import train_loop
    now = [0.0]
    clock = lambda: now[0]
    monkeypatch.setattr(train_loop, "time", SimpleNamespace(time=clock, perf_counter=clock))

    class Sync:
        def step(self):
            now[0] += 0.25 if not seen else 0.75

        def synchronize(self):
            pass

        def global_view(self):
            return contextlib.nullcontext()

    def micro_step(x, y):
        now[0] += 1.0
        return torch.ones((), requires_grad=True)

    def schedule(step):
        now[0] += 0.5
        return 1.0

    seen = []
    train_loop.train_steps(Sync(), 0, 2, 3, micro_step, lambda: (None, None), schedule, device_type="cpu",
                           at_checkpoint=lambda step, at: None, on_step=lambda *args: seen.append(args[3:]))
    assert seen == [(3.75, 0.25), (4.25, 0.75)]
