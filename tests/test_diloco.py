"""DiLoCo wrapper: equivalences with DDP and local training, the outer Nesterov step, worker groups,
communication accounting, compression. Distributed cases run on 2 or 4 gloo processes."""

import argparse

import pytest
import torch
import torch.nn as nn

from diloco import add_sync_args, make_sync, make_worker_groups
from nanochat import comm
from scripts.flags import sync_config
from tests.dist_utils import run_distributed


class GroupSGD(torch.optim.Optimizer):
    """Plain SGD whose gradients are averaged over a process group (the DDP path, minus Muon/AdamW)."""

    def __init__(self, params, lr, process_group=None):
        super().__init__(params, dict(lr=lr))
        self.process_group = process_group

    @torch.no_grad()
    def step(self):
        params = [p for g in self.param_groups for p in g["params"]]
        comm.flat_all_reduce_mean([p.grad for p in params], self.process_group)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def toy_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def sync_args(*argv):
    return sync_config(add_sync_args(argparse.ArgumentParser()).parse_args(list(argv)))


def test_collective_timeout_defaults_to_the_environment(monkeypatch):
    monkeypatch.delenv("NANOCHAT_COLLECTIVE_TIMEOUT", raising=False)
    assert sync_args().collective_timeout == 600.0
    monkeypatch.setenv("NANOCHAT_COLLECTIVE_TIMEOUT", "3600")  # e.g. a run that may be paused (SIGSTOP) for a while
    assert sync_args().collective_timeout == 3600.0 and sync_args("--collective-timeout", "5").collective_timeout == 5.0


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(model, sync, steps, rank, batch_rank=None):
    """Run `steps` inner steps; return the parameters after each step."""
    history = []
    for step in range(steps):
        x, y = toy_batch(rank if batch_rank is None else batch_rank, step)
        nn.functional.mse_loss(model(x), y).backward()
        sync.step()
        history.append(flat_params(model))
    return history


# --- equivalences -------------------------------------------------------------------------------------

def _ddp_vs_diloco_h1(rank, world_size):
    model = toy_model()
    groups = make_worker_groups(sync_args("--sync", "ddp"))
    ddp = train(model, make_sync(sync_args("--sync", "ddp"), model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups), 5, rank)
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "1", "--outer-lr", "1", "--outer-momentum", "0")
    groups = make_worker_groups(args)
    diloco = train(model, make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups), 5, rank)
    return ddp, diloco


def test_diloco_h1_lr1_no_momentum_equals_ddp_sgd(tmp_path):
    for ddp, diloco in run_distributed(_ddp_vs_diloco_h1, 2, tmp_path):
        for a, b in zip(ddp, diloco):
            assert (a - b).abs().max().item() < 1e-6
        assert not torch.equal(ddp[0], ddp[-1])  # it did train


def test_one_worker_lr1_no_momentum_equals_local_training():
    """Single process, K=1: any H, outer lr 1, no momentum -> exactly plain local SGD."""
    model = toy_model()
    opt = GroupSGD(model.parameters(), 0.1)
    local = []
    for step in range(7):
        x, y = toy_batch(0, step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        model.zero_grad()
        local.append(flat_params(model))
    for h in (1, 3, 5):
        model = toy_model()
        args = sync_args("--sync", "diloco", "--diloco-h", str(h), "--outer-lr", "1", "--outer-momentum", "0")
        history = train(model, make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], make_worker_groups(args)), 7, 0)
        for a, b in zip(local, history):
            assert (a - b).abs().max().item() < 1e-6


def _hand_rounds(lrs, h=2, lr_in=0.1, mu=0.9, plain_last=False):
    """Outer Nesterov rounds by hand on one worker, round r with outer lr lrs[r]; plain_last: the last round
    is a plain average (lr 1, momentum untouched and unused). Returns the parameters after each round."""
    ref = toy_model()
    theta = [p.detach().clone() for p in ref.parameters()]
    buf = [torch.zeros_like(t) for t in theta]
    out, step = [], 0
    for r, lr_out in enumerate(lrs):
        for _ in range(h):
            x, y = toy_batch(0, step)
            ref.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr_in * p.grad
            step += 1
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                delta = theta[i] - p
                if plain_last and r == len(lrs) - 1:
                    theta[i] = theta[i] - delta
                else:
                    buf[i] = mu * buf[i] + delta
                    theta[i] = theta[i] - lr_out * (delta + mu * buf[i])
                p.copy_(theta[i])
        out.append(flat_params(ref))
    return out


def test_outer_nesterov_step_matches_hand_computation():
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--outer-lr", "0.7", "--outer-momentum", "0.9")
    model = toy_model()
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], make_worker_groups(args))
    history = train(model, sync, 6, 0)
    for r, expected in enumerate(_hand_rounds([0.7, 0.7, 0.7])):  # three outer rounds
        assert (history[2 * r + 1] - expected).abs().max().item() < 1e-7
    assert sync.num_syncs == 3


def test_outer_lr_warmup_scales_each_round_by_its_launch_step():
    """--outer-lr-warmup 3, H 2: rounds launched at steps 2, 4, 6, 8 use 0.7 x 1/3, 2/3, 1, 1."""
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--outer-lr", "0.7", "--outer-lr-warmup", "3")
    model = toy_model()
    history = train(model, make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], make_worker_groups(args)), 8, 0)
    expected = _hand_rounds([0.7 * 2 / 6, 0.7 * 4 / 6, 0.7, 0.7])
    for r in range(4):
        assert (history[2 * r + 1] - expected[r]).abs().max().item() < 1e-6


def test_outer_final_average_makes_only_the_last_exchange_a_plain_average():
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--outer-final-average", "1")
    model = toy_model()
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], make_worker_groups(args))
    with pytest.raises(RuntimeError, match="set_total_steps"):
        train(model, sync, 2, 0)
    model = toy_model()
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], make_worker_groups(args))
    sync.set_total_steps(6)
    history = train(model, sync, 6, 0)
    expected = _hand_rounds([0.7, 0.7, 0.7], plain_last=True)
    assert not torch.allclose(expected[-1], _hand_rounds([0.7, 0.7, 0.7])[-1])  # the variant changes the result
    for r in range(3):
        assert (history[2 * r + 1] - expected[r]).abs().max().item() < 1e-6
    assert sync.outer_optimizer.param_groups[0]["lr"] == 0.7 and sync.outer_optimizer.param_groups[0]["momentum"] == 0.9


def outer_sgd_reference(k, steps, h, lr_out, lr_in=0.1):
    """Plain DiLoCo written out: K workers of SGD on their own batches; every H steps theta_global -= lr_out x
    the mean of (theta_global - worker) and every worker copies it. Returns the workers' flat weights per step."""
    models = [toy_model() for _ in range(k)]
    theta = flat_params(models[0])
    history = []
    for step in range(steps):
        for rank, m in enumerate(models):
            m.zero_grad()
            x, y = toy_batch(rank, step)
            nn.functional.mse_loss(m(x), y).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= lr_in * p.grad
        if (step + 1) % h == 0:
            theta = theta - lr_out * sum(theta - flat_params(m) for m in models) / k
            for m in models:
                torch.nn.utils.vector_to_parameters(theta.clone(), m.parameters())
        history.append([flat_params(m) for m in models])
    return history


EXACT_SPARSE = {  # every entry sent, fp32 values, no decay: nothing is left behind, nothing carried over
    "none": ["--outer-compression", "none", "--outer-momentum", "0"],
    "sparseloco": ["--outer-compression", "sparseloco", "--outer-sparseloco-density", "1", "--outer-sparseloco-bits", "32",
                   "--outer-ef-decay", "0"],
    "dct": ["--outer-compression", "dct", "--outer-dct-fraction", "1", "--outer-dct-bits", "32", "--outer-ef-decay", "0"],
}


def _exact_sparse(rank, world_size):
    out = {}
    for name, flags in EXACT_SPARSE.items():
        model = toy_model()
        args = sync_args("--sync", "diloco", "--diloco-h", "3", "--outer-lr", "0.7", *flags)  # --outer-momentum 0.9 left
        groups = make_worker_groups(args)
        sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
        out[name] = (train(model, sync, 9, rank), sync.outer_optimizer.param_groups[0]["momentum"])
    return out


def test_sparse_codecs_at_density_1_fp32_no_decay_are_diloco_with_outer_sgd_without_momentum(tmp_path):
    """sparseloco and dct own the outer momentum (their workers' decayed error feedback): the outer step is
    theta -= lr x mean with no momentum on top, even with --outer-momentum 0.9 given. Sending everything in fp32
    with decay 0, that is plain DiLoCo with outer SGD: sparseloco bit for bit, dct (a DCT and back) to float
    rounding, both against codec none with momentum 0 and an independent reference."""
    got = run_distributed(_exact_sparse, 2, tmp_path)
    reference = outer_sgd_reference(2, 9, 3, 0.7)
    for rank in range(2):
        plain, _ = got[rank]["none"]
        for name in ("sparseloco", "dct"):
            history, momentum = got[rank][name]
            assert momentum == 0  # the outer SGD has none: the codec keeps it
            for step in range(9):
                assert (history[step] - reference[step][rank]).abs().max().item() < 1e-6, (name, step)
                if name == "sparseloco":
                    assert torch.equal(history[step], plain[step]), step
        assert not torch.equal(plain[2], plain[8])  # it did train


# --- workers, groups and communication ------------------------------------------------------------------

def _diverge_then_sync(rank, world_size, compression):
    comm.reset_comm_stats()
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "3", "--outer-compression", compression)
    groups = make_worker_groups(args)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
    comm.reset_comm_stats()  # leave out the one-time initial broadcast
    history = train(model, sync, 6, rank)
    return history, comm.comm_stats(), sum(p.numel() for p in model.parameters()), len(list(model.parameters()))


@pytest.mark.parametrize("compression", ["none", "bf16", "int8", "int4", "topk", "dct", "sparseloco"])
def test_workers_diverge_between_syncs_and_agree_after(tmp_path, compression):
    (h0, stats, numel, ntensors), (h1, _, _, _) = run_distributed(_diverge_then_sync, 2, tmp_path, compression)
    for step in range(6):
        synced = (step + 1) % 3 == 0
        if synced:
            assert torch.equal(h0[step], h1[step]), f"workers differ right after the sync at step {step}"
        else:
            assert not torch.equal(h0[step], h1[step]), f"workers identical between syncs at step {step}"
    # bytes per rank per sync at K = 2 (toy model: 212 parameters in 4 tensors of 128, 16, 64, 4): fp32
    # all-reduce; bf16/int8/int4: all_to_all + all-gather of one shard of 106 each, int8/int4 with one fp32
    # scale per 256; topk (2%) and dct (2 of each 64-chunk): one all-gathered payload of 4 bytes per tensor
    # (scale) + per value 1 byte + a 1-byte index (every tensor here has <= 256 entries); sparseloco (1/64 of
    # each tensor, all smaller than a chunk: 2, 1, 1, 1 values): per tensor 4 fp32 levels, 2-bit codes packed in
    # a byte, and indices of 7, 4, 6, 2 bits packed in 2, 1, 1, 1 bytes
    assert (numel, ntensors) == (212, 4)
    expected = {"none": 4 * numel, "bf16": 2 * 2 * 106, "int8": 2 * (106 + 4), "int4": 2 * (53 + 4),
                "topk": 4 * ntensors + 2 * (3 + 1 + 2 + 1), "dct": 4 * ntensors + 2 * 2 * (2 + 1 + 1 + 1),
                "sparseloco": 16 * ntensors + 4 * 1 + (2 + 1 + 1 + 1)}[compression]
    assert stats["outer"]["bytes"] == 2 * expected  # two syncs
    assert "inner" not in stats or stats["inner"]["bytes"] == 0  # one rank per worker: nothing inside


def _two_by_two(rank, world_size):
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--diloco-workers", "2")
    groups = make_worker_groups(args)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
    comm.reset_comm_stats()
    history = train(model, sync, 4, rank)
    return history, comm.comm_stats(), groups.worker_id, [p.numel() for p in model.parameters()]


def test_four_ranks_as_two_workers_of_two(tmp_path):
    results = run_distributed(_two_by_two, 4, tmp_path)
    hist = [r[0] for r in results]
    assert [r[2] for r in results] == [0, 0, 1, 1]
    numels = results[0][3]
    numel = sum(numels)
    for step in range(4):
        # inside a worker: identical after every step (gradients averaged every step)
        assert torch.equal(hist[0][step], hist[1][step]) and torch.equal(hist[2][step], hist[3][step])
        if step % 2 == 1:  # outer sync every H=2
            assert torch.equal(hist[0][step], hist[2][step])
        else:
            assert not torch.equal(hist[0][step], hist[2][step])
    for rank, (_, stats, _, _) in enumerate(results):
        assert stats["inner"]["calls"] >= 4  # a gradient all-reduce per step (+ the in-worker broadcasts)
        # each rank sends only the parameters it owns (every 2nd tensor) across workers, per sync
        owned = sum(n for i, n in enumerate(numels) if i % 2 == rank % 2)
        assert stats["outer"]["bytes"] == 2 * 4 * owned
    # summed over a worker's two ranks: one full model copy per sync
    assert results[0][1]["outer"]["bytes"] + results[1][1]["outer"]["bytes"] == 2 * 4 * numel


def _dying_worker(rank, world_size):
    import os
    import time
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "1")
    groups = make_worker_groups(args)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
    if rank == 1:
        os._exit(3)  # dies without a word
    t0 = time.time()
    try:
        train(model, sync, 3, rank)
    except Exception as e:  # what the survivor sees
        return {"error": str(e), "seconds": time.time() - t0}
    return {"error": None, "seconds": time.time() - t0}


def test_dead_worker_makes_the_other_fail_fast(tmp_path):
    result = run_distributed(_dying_worker, 2, tmp_path, timeout=60, check=False)[0]
    assert result is not None, "the surviving rank hung or crashed without reporting"
    assert result["error"], "the surviving rank carried on as if nothing happened"
    assert result["seconds"] < 30
