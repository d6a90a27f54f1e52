"""Elastic DiLoCo under faults, on loopback: two sites (tests/helpers_elastic.py, each its own process) and a
torchft Lighthouse (its own process, restarted on the same port). One run, in order:

  1. site w1 is killed (SIGKILL) mid-round at step 9 and restarted with --resume: it restores its step-8
     checkpoint, then is healed from w0, which went on alone and is newer;
  2. the restarted w1 stops (SIGSTOP) inside the outer all-reduce at step 30: w0 gives up on it after its
     progress deadline, goes on alone, and w1 is healed when it continues (SIGCONT);
  3. the Lighthouse is killed and restarted on the same port, with both sites training: they wait for it at
     their next sync and go on;
  4. the Lighthouse is killed for good: at their next sync each site stops with one line naming it and how to
     resume; a new one is started, both sites resume from their last save, one with a theta_global off by one ulp,
     which the checksum catches and heals.

After each, the sites' theta_global are bit-identical wherever both were in the same outer sync, the loop's step is
the sync object's at every sync, and the final models are equal. The timeline is printed (pytest -s)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers_elastic import STEPS

from diloco.membership import TorchftMembership, _hash_fields, theta_checksum
from nanochat import comm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 240  # seconds for the whole run: a hang fails in minutes, not at the collective timeout
pytestmark = pytest.mark.timeout(DEADLINE + 60)  # the whole run happens in the first test's fixture


# --- the checksum in the outer all-reduce, against a stand-in for torchft (one peer) ---------------------------

class _Manager:
    """torchft's Manager as seen by TorchftMembership: a quorum of this worker and one peer."""

    def __init__(self, rank):
        self.rank, self.step, self.lowered_to = rank, 7, None

    def start_quorum(self, timeout=None):
        pass

    def num_participants(self):
        return 2

    def participating_rank(self):
        return self.rank

    def errored(self):
        return None

    def should_commit(self):
        self.step += 1
        return True

    def current_step(self):
        return self.step

    def batches_committed(self):
        return 0

    def load_state_dict(self, state):
        self.step = self.lowered_to = state["step"]


class _PeerGroup:
    """Adds the peer's share to the all-reduce, chunk by chunk: its weighted pseudo-gradient, weight and theta_global
    hash (one per try). Keeps each chunk's deadline."""

    def __init__(self, delta, weight, hashes, rank):
        self.delta, self.weight, self.hashes, self.rank, self.deadlines = delta, weight, list(hashes), rank, []

    def allreduce(self, tensors, opts):
        part, n = tensors[0], self.delta.numel()
        if part.storage_offset() == 0:  # a new try: the peer's whole contribution
            fields = torch.zeros(2, 4)
            fields[self.rank] = torch.tensor(_hash_fields(self.hashes.pop(0)))
            self.full = torch.cat([self.delta * self.weight, torch.tensor([float(self.weight)]), fields.reshape(-1)])
        part += self.full[part.storage_offset():part.storage_offset() + part.numel()]
        self.deadlines.append(opts.timeout.total_seconds())
        return type("Work", (), {"wait": lambda self: True})()


def _membership(rank, peer):
    m = TorchftMembership.__new__(TorchftMembership)  # no torchft: the stand-ins above
    m.healed, m.max_retries, m.lighthouse, m.timeout_s, m.peer_timeout_s, m.link_mbps = False, 3, "lh", 5.0, 1.0, 0.0
    m.rates, m.mismatches, m.last_workers, m.last_mismatch, m.manager, m.pg = [], 0, 0, False, _Manager(rank), peer
    comm.label_group(m, "outer")
    return m


def test_the_theta_hash_is_exact_and_independent_of_how_the_tensors_are_cut():
    theta = torch.randn(1000)
    assert theta_checksum([theta]) == theta_checksum([theta[:300], theta[300:]]) == theta_checksum([theta], chunk=7)
    nudged = theta.clone()
    nudged[999] = torch.nextafter(nudged[999], torch.tensor(float("inf")))
    assert theta_checksum([nudged]) != theta_checksum([theta])
    assert theta_checksum([theta.flip(0)]) != theta_checksum([theta])  # positions count, not just values
    h = theta_checksum([theta])
    assert sum(int(v) << (16 * i) for i, v in enumerate(_hash_fields(h))) == h  # 4 fields, exact in fp32


def test_equal_theta_gives_the_weighted_mean_and_the_hashes_are_counted_as_outer_bytes():
    mine, peer = torch.randn(10), torch.randn(10)
    h = theta_checksum([torch.ones(3)])
    m = _membership(0, _PeerGroup(peer, 3, [h], rank=1))
    before = comm.comm_stats().get("outer", {}).get("bytes", 0)
    mean = m.weighted_mean(lambda: (mine, 1), lambda: h)
    torch.testing.assert_close(mean, (mine * 1 + peer * 3) / 4)
    # ring all-reduce of k = 2: 2 (k-1)/k of [10 values, weight, 2 x 4 hash fields], fp32
    assert comm.comm_stats()["outer"]["bytes"] - before == (10 + 1 + 8) * 4
    assert m.mismatches == 0 and m.manager.lowered_to is None


@pytest.mark.parametrize("rank", [0, 1])
def test_differing_theta_heals_the_worker_off_the_reference_and_exchanges_again(rank):
    """Two workers, two hashes: the lowest rank's is the reference. The other marks itself one step behind (the
    next quorum heals it from the peer); the round is exchanged again, and its result is what both apply."""
    mine, peer = torch.randn(10), torch.randn(10)
    ours, theirs = 111, 222
    m = _membership(rank, _PeerGroup(peer, 2, [theirs, ours], rank=1 - rank))
    mean = m.weighted_mean(lambda: (mine, 2), lambda: ours)
    torch.testing.assert_close(mean, (mine + peer) / 2)
    assert m.mismatches == 1
    assert m.manager.lowered_to == (7 if rank == 1 else None)  # committed step 8, set back to 7 to be healed


def test_a_long_exchange_is_sent_in_chunks_each_with_a_deadline_scaled_to_its_bytes():
    """At a measured 64 B/s and --peer-timeout 1, a chunk is 0.5 s of transfer: 8 values. Each chunk's deadline is the
    peer timeout plus twice its transfer time; the first of the first exchange also allows for a heal (8 bytes a
    value of the model: theta_global and momentum), the next exchange's does not."""
    mine, peer = torch.randn(10), torch.randn(10)
    h = theta_checksum([mine])
    group = _PeerGroup(peer, 1, [h, h], rank=1)
    m = _membership(0, group)
    m.min_chunk, m.rates = 1, [64.0]
    for _ in range(2):
        torch.testing.assert_close(m.weighted_mean(lambda: (mine, 1), lambda: h), (mine + peer) / 2)
    # 19 values (10 + weight + 2 x 4 hash fields) in chunks of 8, 8, 3; ring all-reduce of 2: 4 bytes a value on the wire
    assert group.deadlines == [1 + 2 * (32 + 80) / 64, 1 + 2 * 32 / 64, 1 + 2 * 12 / 64,
                               1 + 2 * 32 / 64, 1 + 2 * 32 / 64, 1 + 2 * 12 / 64]


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _lighthouse(port, deadline, min_replicas=1):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "helpers_lighthouse.py"), "--bind", f"[::]:{port}",
           "--min_replicas", str(min_replicas), "--join_timeout_ms", "2000", "--heartbeat_timeout_ms", "3000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, deadline, "the Lighthouse to listen")
    return proc


def _wait(condition, deadline, what):
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _load(out, tag):
    try:
        return torch.load(os.path.join(out, f"{tag}.pt"))
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def _at(out, tag, predicate):
    log = _load(out, tag)
    return log is not None and any(predicate(*r[1:4]) for r in log["records"])


def _paused(proc):
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults"))
    deadline, t0, events = time.time() + DEADLINE, time.time(), []
    event = lambda what: events.append((time.time(), what))
    port = _free_port()
    addr = f"http://localhost:{port}"
    procs, logs = {}, {}

    def site(tag, name, *flags):
        logs[tag] = open(os.path.join(out, f"{tag}.log"), "w")
        procs[tag] = subprocess.Popen([sys.executable, "-m", "tests.helpers_elastic", name, addr, out, "--tag", tag,
                                       *flags], cwd=ROOT, stdout=logs[tag], stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RUST_LOG="warn"))

    lighthouse = _lighthouse(port, deadline)
    # where the Lighthouse faults happen: w0 waits after its sync at 48 (54) while w1 asks for the next quorum,
    # which the Lighthouse holds back until w0 asks too (no quorum of fewer than half of the live workers)
    lighthouse_holds = ("--hold", "46:lh_down:together", "--hold", "52:lh_lost:together")
    try:
        # the two join together (each once the other is up), so w1 dies after training with w0
        site("w0", "w0", "--hold", "20:g1", "--hold", "40:g2", *lighthouse_holds, "--release", "up0", "--wait-for", "up1")
        site("w1", "w1", "--kill-at", "9", "--release", "up1", "--wait-for", "up0")
        _wait(lambda: procs["w1"].poll() is not None, deadline, "w1 to kill itself")
        event("w1 killed (SIGKILL) at step 9")
        site("w1b", "w1", "--resume", "--release", "g1", "--pause-at", "30")
        _wait(lambda: procs["w1b"].poll() is not None or _paused(procs["w1b"]), deadline, "w1 to stop in the exchange")
        assert procs["w1b"].poll() is None, open(os.path.join(out, "w1b.log")).read()[-3000:]
        event("w1 stopped (SIGSTOP) inside the exchange at step 30")
        _wait(lambda: _at(out, "w0", lambda step, inner, workers: step > 30 and workers == 1), deadline,
              "w0 to go on alone")
        event("w0 committed an outer step alone")
        os.kill(procs["w1b"].pid, signal.SIGCONT)
        open(os.path.join(out, "g2"), "w").close()
        event("w1 continued (SIGCONT)")
        _wait(lambda: os.path.exists(os.path.join(out, "holding_lh_down")), deadline, "both sites past step 46")
        lighthouse.kill()
        lighthouse.wait()
        open(os.path.join(out, "lh_down"), "w").close()  # w0 goes on to the sync at step 50 too
        event("Lighthouse killed")
        time.sleep(1.0)
        # a restarted Lighthouse that waits for both sites: the first one back must not go on alone (it would, and
        # the checksum would heal the other when they meet again, but this run could end before that)
        lighthouse = _lighthouse(port, deadline, min_replicas=2)
        event("Lighthouse restarted on the same port")
        _wait(lambda: os.path.exists(os.path.join(out, "holding_lh_lost")), deadline, "both sites past step 52")
        lighthouse.kill()
        lighthouse.wait()
        open(os.path.join(out, "lh_lost"), "w").close()  # w0 goes on to the sync at step 56 too
        event("Lighthouse killed for good")
        _wait(lambda: all(procs[t].poll() is not None for t in ("w0", "w1b")), deadline, "both sites to stop")
        event("both sites stopped")
        lighthouse = _lighthouse(port, deadline, min_replicas=2)
        # both sites resume together (each joins once the other is up): one that resumed alone would run to the end
        # alone (--min-workers 1), as its own model
        site("w0c", "w0", "--resume", "--release", "again0", "--wait-for", "again1")
        site("w1c", "w1", "--resume", "--fork", "--release", "again1", "--wait-for", "again0")
        event("Lighthouse restarted; both sites resumed (w1 off by one ulp)")
        _wait(lambda: all(procs[t].poll() is not None for t in ("w0c", "w1c")), deadline, "the resumed sites to finish")
        event("both sites finished")
        for when, what in events:
            print(f"{when - t0:6.1f} s  {what}")
        torch.save(events, os.path.join(out, "events.pt"))
        codes = {tag: p.returncode for tag, p in procs.items()}
        outputs = {}
        for tag, f in logs.items():
            f.close()
            with open(os.path.join(out, f"{tag}.log")) as f:
                outputs[tag] = f.read()
        held = {gate: torch.load(os.path.join(out, f"holding_{gate}")) for gate in ("lh_down", "lh_lost")}
        yield codes, {tag: _load(out, tag) for tag in procs}, outputs, held
    finally:
        for p in [*procs.values(), lighthouse]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


def _theta_by_step(log):
    return {step: (workers, h) for _, step, _, workers, h in log["records"]}


def _assert_same_where_together(a, b):
    """At every outer sync both took part in together, both hold the same theta_global (by hash)."""
    sa, sb = _theta_by_step(a), _theta_by_step(b)
    shared = [s for s in sa.keys() & sb.keys() if sa[s][0] == sb[s][0] == 2]
    assert shared, "the two sites never synced together"
    assert all(sa[s][1] == sb[s][1] for s in shared), [(s, sa[s], sb[s]) for s in sorted(shared) if sa[s] != sb[s]]
    return sorted(shared)


def test_every_site_loop_follows_the_sync_step(fault_run):
    _, logs, _, _ = fault_run
    for tag, log in logs.items():
        assert all(step == inner for _, step, inner, _, _ in log["records"]), tag


def test_a_killed_site_resumes_its_checkpoint_then_is_healed_from_the_newer_peer(fault_run):
    codes, logs, _, _ = fault_run
    assert codes["w1"] == -signal.SIGKILL
    w0, w1b = logs["w0"], logs["w1b"]
    assert w1b["restored"] == 8  # its own last checkpoint came first...
    assert w1b["joined"] >= 20 and w1b["joined"] in _theta_by_step(w0)  # ...then the newer peer's state and step
    assert _theta_by_step(w1b)[w1b["joined"]][1] == _theta_by_step(w0)[w1b["joined"]][1]
    assert _assert_same_where_together(w0, w1b)[0] == w1b["joined"]


def test_a_site_cut_off_inside_an_exchange_is_dropped_and_healed_when_it_returns(fault_run):
    _, logs, _, _ = fault_run
    w0, w1b = _theta_by_step(logs["w0"]), _theta_by_step(logs["w1b"])
    assert any(workers == 1 for s, (workers, _) in w0.items() if 30 <= s <= 42)  # w0 went on without it
    steps = sorted(w1b)
    back = next(s for s in steps if s > 30)
    assert back >= 42 and steps[steps.index(back) - 1] <= 30  # it jumped to w0's step when healed
    assert w1b[back] == w0[back]


def test_a_lighthouse_back_within_the_quorum_timeout_is_survived(fault_run):
    _, logs, _, held = fault_run
    w0, w1b = logs["w0"], logs["w1b"]
    shared = _assert_same_where_together(w0, w1b)
    # killed while w1 waited for the sync after held["lh_down"]: the same processes made that sync together once it
    # came back, and went on together (to held["lh_lost"], where the next case begins)
    assert [s for s in shared if s > held["lh_down"]][0] == held["lh_down"] + 2 <= held["lh_lost"]


def test_a_lost_lighthouse_stops_each_site_with_one_line_naming_it_and_the_resume_is_identical(fault_run):
    codes, logs, outputs, held = fault_run
    for tag in ("w0", "w1b"):
        assert codes[tag] == 1
        lines = [line for line in outputs[tag].splitlines() if line.strip()]
        assert sum(line.startswith("error:") for line in lines) == 1
        assert lines[-1].startswith("error: no quorum from the torchft Lighthouse http://localhost:") and "--resume" in lines[-1]
        assert not lines[-2].startswith(("  File", "Traceback", "TimeoutError"))  # one line, not a traceback
    w0c, w1c = logs["w0c"], logs["w1c"]
    assert codes["w0c"] == codes["w1c"] == 0
    # both stopped at the sync after held["lh_lost"], which found no Lighthouse, and resumed from their last save
    assert w0c["restored"] == w1c["restored"] == held["lh_lost"] // 4 * 4
    assert w0c["step"] == w0c["inner_step"] == w1c["step"] == w1c["inner_step"] == STEPS
    assert torch.equal(w0c["final"], w1c["final"])


def test_a_site_whose_theta_global_differs_is_healed_not_forked(fault_run):
    _, logs, _, _ = fault_run
    w0c, w1c = logs["w0c"], logs["w1c"]
    assert w0c["mismatches"] >= 1 and w1c["mismatches"] >= 1  # both saw the one-ulp difference...
    _assert_same_where_together(w0c, w1c)  # ...and from then on hold the same theta_global
    assert torch.equal(w0c["final"], w1c["final"])


def test_the_loop_takes_its_step_from_a_sync_that_owns_it_and_stops_past_the_end():
    from types import SimpleNamespace

    from nanochat.train_loop import loop_step, plan
    assert loop_step(7, SimpleNamespace(owned_step=None)) == 7  # DDP, plain DiLoCo: the loop counts
    assert loop_step(7, SimpleNamespace(owned_step=40)) == 40  # elastic: healed to a peer's step
    assert loop_step(7, object()) == 7
    # a heal that jumps past the end or --stop-after stops there (and saves), it does not run on forever
    assert plan(42, 40).stop and plan(42, 40).last and plan(42, 40).save
    assert plan(12, 40, stop_after=10).stop and not plan(12, 40, stop_after=10).last
    assert not plan(12, 40).stop and not plan(12, 40, stop_after=-1).stop
