"""Streaming DiLoCo and exact resume inside the sync object: plain DiLoCo is unchanged bit for bit, fragments
with overlap follow an independent single-process reference of the rule, evaluation through global_view
changes nothing, a state saved with exchanges in flight resumes exactly, and overlap hides a slow link."""

import argparse
import time

import pytest
import torch
import torch.nn as nn

from diloco import add_sync_args, make_sync, make_worker_groups
from diloco.fragments import split_into_fragments
from nanochat import comm
from scripts.flags import sync_config
from tests.dist_utils import run_distributed
from tests.test_diloco import GroupSGD, flat_params, toy_batch, toy_model


def sync_args(*argv):
    return sync_config(add_sync_args(argparse.ArgumentParser()).parse_args(list(argv)))


def inner_step(model, sync, rank, step):
    x, y = toy_batch(rank, step)
    nn.functional.mse_loss(model(x), y).backward()
    sync.step()


def build(argv):
    model = toy_model()
    args = sync_args(*argv)
    groups = make_worker_groups(args)
    optimizer = GroupSGD(model.parameters(), 0.1, groups.inner)
    return model, optimizer, make_sync(args, model, [optimizer], groups)


def test_fragments_are_contiguous_balanced_runs_of_rows():
    params = list(toy_model().parameters())  # 16x8, 16, 4x16, 4: 212 numbers
    one = split_into_fragments(params, 1)
    assert len(one) == 1 and all(a is not b and a.data_ptr() == b.data_ptr() for a, b in zip(one[0], params))
    two = split_into_fragments(params, 2)  # the cut at 106 falls in row 13.25 of the first matrix -> row 13
    assert [sum(p.numel() for p in frag) for frag in two] == [104, 108]
    assert two[0][0].data_ptr() == params[0].data_ptr() and two[1][0].data_ptr() == params[0][13].data_ptr()
    four = split_into_fragments(params, 4)
    assert sum(p.numel() for frag in four for p in frag) == 212
    assert max(sum(p.numel() for p in frag) for frag in four) <= 64
    with pytest.raises(ValueError, match="--diloco-fragments"):
        split_into_fragments([torch.zeros(3)], 4)


def test_flags_out_of_range_are_refused_with_the_flag_named():
    for argv, flag in ((["--diloco-h", "4", "--diloco-fragments", "5"], "--diloco-fragments"),
                       (["--diloco-h", "4", "--diloco-fragments", "2", "--diloco-overlap", "2"], "--diloco-overlap"),
                       (["--fragment-alpha", "1.5"], "--fragment-alpha"), (["--diloco-h", "0"], "--diloco-h")):
        with pytest.raises(ValueError, match=flag):
            build(["--sync", "diloco", *argv])


# --- an independent reference of the streaming rule, K workers simulated in one process ------------------

def streaming_reference(k, steps, h, frag_bounds, tau, alpha, lr_out, mu, lr_in=0.1, finish=False):
    """Flat-vector Streaming DiLoCo with SGD inner steps and Nesterov outer steps; returns each worker's
    flat weights after every step. frag_bounds: (start, end) of each fragment in the flat vector.
    finish: also return theta_global after the end of training: exchanges in flight are applied, then every
    fragment that took inner steps since its last exchange was applied syncs once more; and the number of
    fragment syncs applied in all."""
    models = [toy_model() for _ in range(k)]
    flat = lambda m: torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    theta = flat(models[0])
    buf = torch.zeros_like(theta)
    F = len(frag_bounds)
    apply_at = [round((f + 1) * h / F) % h for f in range(F)]
    in_flight = {}
    history = []
    applied_at = [0] * F
    outer_steps = 0

    def outer(a, b, mean):
        buf[a:b] = mu * buf[a:b] + mean
        theta[a:b] = theta[a:b] - lr_out * (mean + mu * buf[a:b])

    for step in range(steps):
        for rank, m in enumerate(models):
            m.zero_grad()
            x, y = toy_batch(rank, step)
            nn.functional.mse_loss(m(x), y).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= lr_in * p.grad
        n = step + 1
        weights = [flat(m) for m in models]
        for f, (a, b) in enumerate(frag_bounds):
            if n % h == apply_at[f]:
                mean = in_flight.pop(f) if tau else sum(theta[a:b] - w[a:b] for w in weights) / k
                outer(a, b, mean)
                applied_at[f], outer_steps = n, outer_steps + 1
                for w in weights:
                    w[a:b] = alpha * w[a:b] + (1 - alpha) * theta[a:b]
            if tau and n % h == (apply_at[f] - tau) % h:
                in_flight[f] = sum(theta[a:b] - w[a:b] for w in weights) / k
        for m, w in zip(models, weights):
            torch.nn.utils.vector_to_parameters(w.clone(), m.parameters())  # the parameters become views of it
        history.append(weights)
    if not finish:
        return history
    for f, mean in in_flight.items():
        outer(*frag_bounds[f], mean)
        applied_at[f], outer_steps = steps, outer_steps + 1
    for f, (a, b) in enumerate(frag_bounds):
        if applied_at[f] < steps:
            outer(a, b, sum(theta[a:b] - w[a:b] for w in history[-1]) / k)
            outer_steps += 1
    return history, theta, outer_steps


STREAMING_CASES = [(2, 1, 0.0), (2, 0, 0.5), (4, 1, 0.25)]  # (fragments, overlap, alpha)


def _streaming(rank, world_size, h, steps):
    results = []
    for fragments, tau, alpha in STREAMING_CASES:  # one set of processes for every case: spawning is slow
        model, _, sync = build(["--sync", "diloco", "--diloco-h", str(h), "--diloco-fragments", str(fragments),
                                "--diloco-overlap", str(tau), "--fragment-alpha", str(alpha), "--outer-lr", "0.7",
                                "--outer-momentum", "0.9"])
        history = []
        for step in range(steps):
            inner_step(model, sync, rank, step)
            history.append(flat_params(model))
        results.append(history)
    return results


def test_streaming_equals_an_independent_reference(tmp_path):
    h, steps = 8, 19
    got = run_distributed(_streaming, 2, tmp_path, h, steps)
    for case, (fragments, tau, alpha) in enumerate(STREAMING_CASES):
        sizes = [sum(p.numel() for p in frag) for frag in split_into_fragments(list(toy_model().parameters()), fragments)]
        bounds = [(sum(sizes[:f]), sum(sizes[:f + 1])) for f in range(fragments)]
        ref = streaming_reference(2, steps, h, bounds, tau, alpha, 0.7, 0.9)
        for step in range(steps):
            for rank in range(2):
                assert (got[rank][case][step] - ref[step][rank]).abs().max().item() < 1e-6, (fragments, tau, alpha, step)
        assert not torch.equal(got[0][case][-1], got[1][case][-1])  # workers drift between fragment syncs


# --- the end of training --------------------------------------------------------------------------------

END_CASES = [(12, 0.0), (12, 0.5), (11, 0.0)]  # (steps, alpha) at H 8, F 2, overlap 1


def _end_of_training(rank, world_size):
    results = []
    for steps, alpha in END_CASES:
        model, _, sync = build(["--sync", "diloco", "--diloco-h", "8", "--diloco-fragments", "2", "--diloco-overlap", "1",
                                "--fragment-alpha", str(alpha), "--outer-lr", "0.7", "--outer-momentum", "0.9"])
        history = []
        for step in range(steps):
            inner_step(model, sync, rank, step)
            history.append(flat_params(model))
        sync.synchronize()
        results.append((history, flat_params(model), sync.num_syncs))
    return results


def test_a_fragment_whose_exchange_landed_on_the_last_step_is_not_synced_again(tmp_path):
    """H 8, F 2, overlap 1: fragment 0 applies at steps 4, 12 (launched at 3, 11), fragment 1 at 8. At 12 steps
    fragment 0 lands on the last step: nothing new since, so the end of training leaves it as it landed (a
    second sync would be a zero pseudo-gradient turned into a pure Nesterov step); fragment 1 took steps 9-12
    since it landed and syncs once more. At 11 steps fragment 0 is in flight and is applied at the end."""
    got = run_distributed(_end_of_training, 2, tmp_path)
    sizes = [sum(p.numel() for p in frag) for frag in split_into_fragments(list(toy_model().parameters()), 2)]
    bounds = [(0, sizes[0]), (sizes[0], sum(sizes))]
    for case, (steps, alpha) in enumerate(END_CASES):
        _, theta, syncs = streaming_reference(2, steps, 8, bounds, 1, alpha, 0.7, 0.9, finish=True)
        assert syncs == 4  # fragment 0: at 4 and 12 (11 steps: at the end, from flight); fragment 1: at 8 and the end
        for rank in range(2):
            history, final, num_syncs = got[rank][case]
            assert (final - theta).abs().max().item() < 1e-6, (steps, alpha)
            assert num_syncs == syncs, (steps, alpha)
            if (steps, alpha) == (12, 0.0):  # landed at the last step: the final weights are exactly those it landed on
                assert torch.equal(final[:sizes[0]], history[-1][:sizes[0]])
                assert not torch.equal(final[sizes[0]:], history[-1][sizes[0]:])  # fragment 1 synced once more


# --- exact resume and side-effect-free evaluation ---------------------------------------------------------

STREAM = ["--sync", "diloco", "--diloco-h", "4", "--diloco-fragments", "2", "--diloco-overlap", "1",
          "--fragment-alpha", "0.5"]


def _resume(rank, world_size):
    return [_resume_case(rank, argv, stop) for argv, stop in RESUME_CASES]


def _resume_case(rank, argv, stop):
    model, opt, sync = build(argv)
    straight = []
    for step in range(10):
        inner_step(model, sync, rank, step)
        if step == 2:
            with sync.global_view():  # an evaluation mid-round
                seen = flat_params(model)
        straight.append(flat_params(model))
    sync.synchronize()
    straight_final = flat_params(model)

    model, opt, sync = build(argv)
    for step in range(stop):
        inner_step(model, sync, rank, step)
    with sync.global_view():
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}  # what a checkpoint's model.pt holds
        saved_sync = sync.state_dict()  # taken inside the view: still the worker's own weights
        portable = sync.portable_state_dict()  # the layout-independent part (collective); marks what is in flight
    if saved_sync["pending"]:
        assert portable == {"mode": "diloco", "in_flight": sorted(saved_sync["pending"])}
        with pytest.raises(ValueError, match="same layout"):
            build(argv)[2].load_portable_state_dict(portable)
    saved_opt = opt.state_dict()
    in_flight = len(saved_sync["pending"])
    model, opt, sync = build(argv)  # a new process, as after a preemption
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    sync.load_state_dict(saved_sync)
    resumed = []
    for step in range(stop, 10):
        inner_step(model, sync, rank, step)
        resumed.append(flat_params(model))
    sync.synchronize()
    return straight, straight_final, resumed, flat_params(model), in_flight, seen


RESUME_CASES = [(["--sync", "diloco", "--diloco-h", "5"], 7), (STREAM, 5)]


def test_resume_at_any_step_is_exact_with_exchanges_in_flight(tmp_path):
    for rank_results in run_distributed(_resume, 2, tmp_path):
        for (argv, stop), result in zip(RESUME_CASES, rank_results):
            straight, straight_final, resumed, resumed_final, in_flight, seen = result
            assert len(resumed) == 10 - stop and all(torch.equal(a, b) for a, b in zip(straight[stop:], resumed))
            assert torch.equal(straight_final, resumed_final)
            assert in_flight == (1 if argv is STREAM else 0)  # step 5: fragment 0 launched, applied at step 6
            assert not torch.equal(seen, straight[2])  # the view showed theta_global, not the drifted worker


def _eval_changes_nothing(rank, world_size):
    results = []
    for evaluate_every in (0, 3):
        model, _, sync = build(["--sync", "diloco", "--diloco-h", "5", "--diloco-workers", "2"])
        for step in range(12):
            inner_step(model, sync, rank, step)
            if evaluate_every and step % evaluate_every == 0:
                with sync.global_view():
                    model(torch.randn(2, 8)).sum().item()
        sync.synchronize()
        results.append((flat_params(model), sync.num_syncs))
    return results


def test_global_view_leaves_training_unchanged_on_two_workers_of_two_ranks(tmp_path):
    results = run_distributed(_eval_changes_nothing, 4, tmp_path)
    for (quiet, syncs_quiet), (watched, syncs_watched) in results:
        assert torch.equal(quiet, watched) and syncs_quiet == syncs_watched == 3  # at 5, 10 and the final one at 12
    assert all(torch.equal(results[0][0][0], r[0][0]) for r in results)  # one theta_global everywhere at the end


# --- overlap hides a slow link -----------------------------------------------------------------------------

def _slow_link(rank, world_size):
    waits = []
    for tau in (0, 3):
        model, _, sync = build(["--sync", "diloco", "--diloco-h", "4", "--diloco-overlap", str(tau), "--comm-delay-ms", "150"])
        for step in range(8):
            inner_step(model, sync, rank, step)
            time.sleep(0.2)  # stands in for an inner step's compute: 450 ms of slack a loaded machine cannot eat
        waits.append(sync.wait_seconds)  # before the end-of-training sync, which blocks in both cases
        sync.synchronize()
    comm.set_comm_delay("outer", 0)
    return waits


def test_overlap_hides_a_slow_link_that_blocking_sync_pays(tmp_path):
    for wait_blocking, wait_overlap in run_distributed(_slow_link, 2, tmp_path):
        assert wait_blocking >= 2 * 0.15  # two syncs, each pays the delay
        assert wait_overlap < 0.5 * wait_blocking  # 600 ms of inner steps cover each 150 ms exchange
