"""Elastic DiLoCo over torchft (CPU, gloo, loopback): two workers, each its own process meeting at a Lighthouse.
Worker 1 kills itself with SIGKILL mid-round; worker 0 goes on alone (no hang, its inner steps kept); a fresh
worker 1 then joins, is healed from worker 0 (theta_global, outer momentum, step counter) and from the next
outer step on holds exactly worker 0's theta_global."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.nn as nn

from diloco import make_sync
from diloco.sync import WorkerGroups
from tests.test_diloco import GroupSGD, sync_args, toy_batch, toy_model

H = 2
pytestmark = pytest.mark.timeout(420)  # the whole run happens in the first test's fixture


def _worker(name, lighthouse, out_dir, role):
    """role: "survivor" trains until the joiner has been with it for 2 rounds; "victim" dies 3 inner steps after
    its first outer step with the survivor; "joiner" (started after the death) stops 2 rounds after it joined. Each records, after every outer
    step, (inner step, workers in the exchange, theta_global)."""
    torch.set_num_threads(1)
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", str(H), "--outer-lr", "0.7", "--elastic", "torchft",
                     "--lighthouse", lighthouse, "--replica-id", name, "--collective-timeout", "10")
    groups = WorkerGroups(1, 1, 0, 0, None, None)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], groups)
    sync.join()
    joined_at, records, rejoined_at, met_peer_at = sync.inner_step, [], None, None
    deadline = time.time() + 280  # generous: a loaded machine may take a minute to spawn the joiner
    while time.time() < deadline:
        x, y = toy_batch(hash(name) % 7, sync.inner_step)
        nn.functional.mse_loss(model(x), y).backward()
        sync.step()
        if role == "victim" and met_peer_at is not None and sync.inner_step == met_peer_at + 3:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-round, once it has synced with the survivor
        if sync.inner_step % H == 0:
            workers = sync.membership.workers()
            if workers == 2 and met_peer_at is None:
                met_peer_at = sync.inner_step
            records.append((sync.inner_step, workers, torch.cat([t.reshape(-1) for t in sync.fragments[0].theta]).clone()))
            torch.save({"joined_at": joined_at, "records": records}, os.path.join(out_dir, f"{role}.pt"))
            seen = [r[1] for r in records]
            if role == "survivor" and rejoined_at is None and workers == 2 and 1 in seen[seen.index(2) + 1:]:
                rejoined_at = sync.inner_step  # had a peer, lost it, has one again
            stop_at = {"survivor": rejoined_at, "victim": None, "joiner": joined_at}[role]
            if stop_at is not None and sync.inner_step >= stop_at + 2 * H and (role != "survivor" or rejoined_at):
                break
        time.sleep(0.01)
    sync.membership.shutdown()
    os._exit(0 if time.time() < deadline else 3)


def _went_alone(path):
    try:
        seen = [workers for _, workers, _ in torch.load(path)["records"]]
        return 2 in seen and 1 in seen[seen.index(2) + 1:]  # had a peer, then a round without it
    except Exception:  # not written yet, or caught while being written
        return False


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    from torchft.coordination import LighthouseServer
    out = tmp_path_factory.mktemp("elastic")
    # a 3 s heartbeat timeout: a busy machine that delays a live worker's heartbeat must not drop it from the quorum
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=2000, heartbeat_timeout_ms=3000)
    ctx = mp.get_context("spawn")
    procs = {}
    try:
        for role, name in (("survivor", "w0"), ("victim", "w1")):
            procs[role] = ctx.Process(target=_worker, args=(name, lighthouse.address(), str(out), role))
            procs[role].start()
        deadline = time.time() + 320  # one budget for the whole run, so a hang fails in minutes
        procs["victim"].join(120)
        # the joiner starts once the survivor has gone on alone: with the same replica id, a joiner that came up
        # before the Lighthouse timed the victim out would simply take its place, and no round alone would happen
        while time.time() < deadline and not _went_alone(out / "survivor.pt"):
            time.sleep(0.2)
        procs["joiner"] = ctx.Process(target=_worker, args=("w1", lighthouse.address(), str(out), "joiner"))
        procs["joiner"].start()
        for p in procs.values():
            p.join(max(1.0, deadline - time.time()))
        codes = {role: p.exitcode for role, p in procs.items()}
        yield codes, {role: torch.load(out / f"{role}.pt") for role in procs if (out / f"{role}.pt").exists()}
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
        lighthouse.shutdown()


def test_a_killed_worker_does_not_stop_the_survivor(elastic_run):
    codes, logs = elastic_run
    assert codes == {"survivor": 0, "victim": -signal.SIGKILL, "joiner": 0}, codes
    survivor = logs["survivor"]["records"]
    workers = [w for _, w, _ in survivor]
    first_alone = workers.index(1, workers.index(2))  # it had a peer, then went on alone
    steps = [s for s, _, _ in survivor]
    assert steps == list(range(steps[0], steps[-1] + 1, H))  # every round of the survivor was applied, none lost
    assert first_alone > 0 and workers[first_alone:].count(1) >= 1


def test_a_rejoining_worker_is_healed_and_ends_the_next_outer_step_identical(elastic_run):
    _, logs = elastic_run
    survivor = {s: (w, theta) for s, w, theta in logs["survivor"]["records"]}
    joiner = logs["joiner"]
    assert joiner["joined_at"] > 0 and joiner["joined_at"] % H == 0  # the step counter came from the peer
    assert len(joiner["records"]) >= 2
    for step, workers, theta in joiner["records"]:
        assert workers == 2 and torch.equal(theta, survivor[step][1])
