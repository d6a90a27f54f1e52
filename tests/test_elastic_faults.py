"""Elastic DiLoCo under faults, on loopback: two sites (tests/helpers_elastic.py, each its own process) and a
torchft Lighthouse (its own process, restarted on the same port). One run, each fault at an exact step, the next
one triggered by files the sites write (a sleep only sets how long the Lighthouse stays down):

  1. site w1 stops (SIGSTOP) inside the outer all-reduce at step 10, as a site cut off mid-exchange: w0 gives up on
     it after its progress deadline and goes on alone to step 20, and w1 is healed to w0's step when it continues;
  2. the Lighthouse is killed and restarted on the same port, with both sites training: they wait for it at their
     next sync and go on. From here on it forms no quorum of one (--min_replicas 2);
  3. w1 is killed (SIGKILL) mid-round at step 33 and restarted with --resume while w0 waits before its sync at
     step 34: w1 restores its step-32 checkpoint and joins w0's sync at 34, one round ahead of it, and must be
     healed to step 34 (torchft's own count of committed syncs is the same on both there: the fork that had this
     work reverted once);
  4. the Lighthouse is killed for good: at their next sync each site stops with one line naming it and how to
     resume; a new one is started, both sites resume from their last save, one with a theta_global off by one ulp,
     which the checksum catches and heals.

Each case ends at a sync both sites make together with bit-identical theta_global and the loop's step equal to the
sync's on both; the run ends with bit-identical final models at the last step. Assertions are on steps, worker
counts and tensors, never on times; the timeline (stalls measured from the sites' records) is printed (pytest -s)
and saved."""

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
DEADLINE = 240  # seconds for the whole run, starting 5 processes included: a hang fails in minutes
pytestmark = pytest.mark.timeout(DEADLINE + 60)  # the whole run happens in the first test's fixture


# --- the checksum in the outer all-reduce, against a stand-in for torchft (one peer) ---------------------------

class _Manager:
    """torchft's Manager as seen by TorchftMembership: a quorum of this worker and one peer. `step` is what torchft
    counts (committed syncs); quorum_steps the step this worker reported at each quorum (torchft heals it when that
    is below the highest in the quorum)."""

    def __init__(self, rank, step=5):
        self.rank, self.step, self.quorum_steps = rank, step, []

    def start_quorum(self, timeout=None):
        self.quorum_steps.append(self.step)

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
        self.step = state["step"]


class _PeerGroup:
    """Adds the peer's share to the all-reduce, chunk by chunk: its weighted pseudo-gradient, weight and theta_global
    hash (one per try). Keeps each chunk's deadline."""

    def __init__(self, delta, weight, hashes, rank):
        self.delta, self.weight, self.hashes, self.rank, self.deadlines = delta, weight, list(hashes), rank, []

    def allreduce(self, tensors, opts):
        part = tensors[0]
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
    m.behind = False
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
    mean = m.weighted_mean(lambda: (mine, 1), lambda: h, lambda: 10)
    assert torch.allclose(mean, (mine * 1 + peer * 3) / 4, rtol=1e-6, atol=0)
    # ring all-reduce of k = 2: 2 (k-1)/k of [10 values, weight, 2 x 4 hash fields], fp32
    assert comm.comm_stats()["outer"]["bytes"] - before == (10 + 1 + 8) * 4
    assert m.mismatches == 0


def test_a_worker_reports_its_inner_step_at_the_quorum_not_torchfts_count_of_syncs():
    """torchft heals a worker whose step is below the quorum's highest. A site restored from its checkpoint after the
    sync at inner step 8 has committed as many syncs as a live peer now at the sync of step 10 (the peer's sync at 10
    is not committed yet): by that count neither is behind, and the two would go on two inner steps apart. By inner
    step, the restored site (8 < 10) is healed."""
    h = theta_checksum([torch.ones(3)])
    restored = _membership(1, _PeerGroup(torch.zeros(10), 2, [h], rank=0))
    restored.manager.step = 5  # its checkpoint's count of committed syncs: the live peer's too
    restored.weighted_mean(lambda: (torch.zeros(10), 0), lambda: h, lambda: 8)
    assert restored.manager.quorum_steps == [8]


@pytest.mark.parametrize("rank", [0, 1])
def test_differing_theta_heals_the_worker_off_the_reference_and_exchanges_again(rank):
    """Two workers, two hashes: the lowest rank's is the reference. The other reports itself one step behind at the
    next quorum (which heals it from the peer); the round is exchanged again, and its result is what both apply."""
    mine, peer = torch.randn(10), torch.randn(10)
    ours, theirs = 111, 222
    m = _membership(rank, _PeerGroup(peer, 2, [theirs, ours], rank=1 - rank))
    mean = m.weighted_mean(lambda: (mine, 2), lambda: ours, lambda: 8)
    assert torch.allclose(mean, (mine + peer) / 2, rtol=1e-6, atol=0)
    assert m.mismatches == 1
    assert m.manager.quorum_steps == ([8, 7] if rank == 1 else [8, 8]) and not m.behind


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
        mean = m.weighted_mean(lambda: (mine, 1), lambda: h, lambda: 2)
        assert torch.allclose(mean, (mine + peer) / 2, rtol=1e-6, atol=0)
    # 19 values (10 + weight + 2 x 4 hash fields) in chunks of 8, 8, 3; ring all-reduce of 2: 4 bytes a value on the wire
    assert group.deadlines == [1 + 2 * (32 + 80) / 64, 1 + 2 * 32 / 64, 1 + 2 * 12 / 64,
                               1 + 2 * 32 / 64, 1 + 2 * 32 / 64, 1 + 2 * 12 / 64]


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _lighthouse(port, deadline, log, min_replicas=1):
    """A Lighthouse on `port`; its log (RUST_LOG=info: a line for each quorum request it receives) goes to `log`."""
    cmd = [sys.executable, os.path.join(ROOT, "tests", "helpers_lighthouse.py"), "--bind", f"[::]:{port}",
           "--min_replicas", str(min_replicas), "--join_timeout_ms", "2000", "--heartbeat_timeout_ms", "3000"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(listening, deadline, "the Lighthouse to listen")
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


def _requests(log, name):
    """Quorum requests the Lighthouse logged from site `name` (any of its processes)."""
    with open(log) as f:
        return f.read().count(f"Received quorum request for replica {name}:")


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults"))
    deadline, t0, events = time.time() + DEADLINE, time.time(), {}
    port = _free_port()
    addr = f"http://localhost:{port}"
    procs, logs = {}, {}
    file = lambda name: os.path.join(out, name)
    gate = lambda name: open(file(name), "w").close()
    holding = lambda name: os.path.exists(file(f"holding_{name}"))

    def site(tag, name, *flags):
        logs[tag] = open(file(f"{tag}.log"), "w")
        procs[tag] = subprocess.Popen([sys.executable, "-m", "tests.helpers_elastic", name, addr, out, "--tag", tag,
                                       *flags], cwd=ROOT, stdout=logs[tag], stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RUST_LOG="warn"))

    def stopped(*tags):  # waits for the sites to exit; the time each was seen gone
        for tag in tags:
            _wait(lambda: procs[tag].poll() is not None, deadline, f"{tag} to exit")
            events[f"{tag} exited"] = time.time()

    def kill_lighthouse(lighthouse, name, waiting_for, event):  # once both sites hold at gate `name`; then release it
        _wait(lambda: holding(name), deadline, waiting_for)
        lighthouse.kill()
        lighthouse.wait()
        events[event] = time.time()
        gate(name)

    lighthouse = _lighthouse(port, deadline, file("lighthouse1.log"))
    try:
        # the two sites start together (each joins once the other is up); w0 holds at the steps named below
        site("w0", "w0", "--hold", "20:w1_continued", "--hold", "26:lh_down:together", "--hold", "33:w1_back",
             "--hold", "44:lh_lost:together", "--release", "up0", "--wait-for", "up1")
        site("w1", "w1", "--pause-at", "10", "--kill-at", "33", "--release", "up1", "--wait-for", "up0")
        # the sites of cases 3 and 4 start now too, each waiting for its gate: their imports overlap the run
        site("w1b", "w1", "--start-after", "w1_dead", "--resume", "--release", "w1_back")
        site("w0c", "w0", "--start-after", "resume", "--resume", "--release", "again0", "--wait-for", "again1")
        site("w1c", "w1", "--start-after", "resume", "--resume", "--fork", "--release", "again1", "--wait-for", "again0")
        # 1. w1 stops itself inside the exchange at step 10; w0 goes on alone and waits at step 20
        _wait(lambda: procs["w1"].poll() is not None or _paused(procs["w1"]), deadline, "w1 to stop in the exchange")
        assert procs["w1"].poll() is None, open(file("w1.log")).read()[-3000:]
        events["w1 paused"] = time.time()
        _wait(lambda: holding("w1_continued"), deadline, "w0 to go on alone to step 20")
        asked = _requests(file("lighthouse1.log"), "w1")
        os.kill(procs["w1"].pid, signal.SIGCONT)
        events["w1 continued"] = time.time()
        # w0 goes on once w1, back, has asked the Lighthouse for a quorum (else w0 could sync alone again first)
        _wait(lambda: _requests(file("lighthouse1.log"), "w1") > asked, deadline, "w1 to ask for a quorum")
        gate("w1_continued")
        # 2. the Lighthouse is killed while w1 waits for the sync at 28 and w0 holds at 26, then restarted, waiting for
        # both sites (the first one back must not go on alone: it would, and the checksum would heal the other when
        # they meet again, but not at a step this test can name)
        kill_lighthouse(lighthouse, "lh_down", "both sites past step 26", "Lighthouse killed")  # w0 goes on to 28 too
        time.sleep(1.0)  # the outage
        lighthouse = _lighthouse(port, deadline, file("lighthouse2.log"), min_replicas=2)
        events["Lighthouse back"] = time.time()
        # 3. w1 kills itself at step 33; w0 holds at 33 until the restarted w1 is up (it releases w1_back just before
        # it joins), so w1 (restored at 32) meets w0 at w0's sync at 34
        stopped("w1")
        gate("w1_dead")
        # 4. the Lighthouse is killed for good while w1 waits for the sync at 46 and w0 holds at 44
        kill_lighthouse(lighthouse, "lh_lost", "both sites past step 44", "Lighthouse killed for good")  # w0 to 46 too
        stopped("w0", "w1b")
        lighthouse = _lighthouse(port, deadline, file("lighthouse3.log"), min_replicas=2)
        gate("resume")  # both sites resume together (each joins once the other is up)
        events["Lighthouse restarted, both sites resumed"] = time.time()
        stopped("w0c", "w1c")
        codes = {tag: p.returncode for tag, p in procs.items()}
        outputs = {}
        for tag, f in logs.items():
            f.close()
            with open(file(f"{tag}.log")) as f:
                outputs[tag] = f.read()
        held = {name: torch.load(file(f"holding_{name}")) for name in ("w1_continued", "lh_down", "w1_back", "lh_lost")}
        events["w1 up again"] = os.path.getmtime(file("w1_back"))
        run = dict(codes=codes, logs={tag: _load(out, tag) for tag in procs}, outputs=outputs, held=held, events=events)
        torch.save({"events": events, "logs": run["logs"], "t0": t0}, file("run.pt"))
        _print_timeline(run, t0)
        yield run
    finally:
        for p in [*procs.values(), lighthouse]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


def _sync_times(log):
    return {step: when for when, step, _, _, _ in log["records"]}


def _print_timeline(run, t0):
    """What the faults cost, from the sites' own records (times of their outer syncs): printed, never asserted."""
    ev, logs = run["events"], run["logs"]
    w0, w1, w1b, w0c = (_sync_times(logs[t]) for t in ("w0", "w1", "w1b", "w0c"))
    at = lambda t: f"{t - t0:6.1f} s"
    lines = [f"{at(ev['w1 paused'])}  1. w1 stopped (SIGSTOP) inside the exchange at step 10",
             f"{at(w0[10])}     w0 went on alone: its sync at 10 took {w0[10] - w0[8]:.1f} s (the one at 8: "
             f"{w0[8] - w0[6]:.2f} s)",
             f"{at(ev['w1 continued'])}     w1 continued (SIGCONT), w0 released from step 20",
             f"{at(w1[22])}     w1 healed from 10 to 22 at w0's sync, {w1[22] - ev['w1 continued']:.1f} s after",
             f"{at(ev['Lighthouse killed'])}  2. Lighthouse killed (w0 at 26, w1 waiting at the sync at 28)",
             f"{at(ev['Lighthouse back'])}     Lighthouse back on the same port",
             f"{at(w0[28])}     sync at 28: {w0[28] - ev['Lighthouse killed']:.1f} s after the kill, "
             f"{w0[28] - ev['Lighthouse back']:.1f} s after it was back",
             f"{at(ev['w1 exited'])}  3. w1 killed (SIGKILL) at step 33 (last save: 32), w0 waiting at 33",
             f"{at(ev['w1 up again'])}     w1 restarted with --resume, up ({ev['w1 up again'] - ev['w1 exited']:.1f} s)",
             f"{at(w0[34])}     sync at 34, w1 healed from 32 to 34: {w0[34] - ev['w1 up again']:.1f} s after it was up",
             f"{at(ev['Lighthouse killed for good'])}  4. Lighthouse killed for good (w0 at 44, w1 waiting at 46)",
             f"{at(ev['w0 exited'])}     w0 stopped with one line, {ev['w0 exited'] - ev['Lighthouse killed for good']:.1f} s "
             f"after the kill",
             f"{at(ev['w1b exited'])}     w1 stopped with one line",
             f"{at(ev['Lighthouse restarted, both sites resumed'])}     Lighthouse restarted, both resumed (w1 one ulp off)",
             f"{at(min(w0c.values()))}     first sync of the resumed sites (step {min(w0c)}), the checksum healed w1",
             f"{at(max(ev['w0c exited'], ev['w1c exited']))}     both finished at step {STEPS}, final models "
             f"{'identical' if torch.equal(logs['w0c']['final'], logs['w1c']['final']) else 'DIFFERENT'}"]
    print("\n" + "\n".join(lines))


def _syncs(log):
    """{sync step: (workers, theta_global)} of a site's outer syncs."""
    return {step: (workers, theta) for _, step, _, workers, theta in log["records"]}


def _same_at(a, b, step):
    """Both sites made the sync at `step` together and hold bit-identical theta_global after it."""
    (wa, ta), (wb, tb) = _syncs(a)[step], _syncs(b)[step]
    return wa == wb == 2 and torch.equal(ta, tb)


def _assert_same_where_together(a, b):
    """At every outer sync both took part in together, both hold the same theta_global."""
    sa, sb = _syncs(a), _syncs(b)
    shared = sorted(s for s in sa.keys() & sb.keys() if sa[s][0] == sb[s][0] == 2)
    assert shared, "the two sites never synced together"
    assert all(torch.equal(sa[s][1], sb[s][1]) for s in shared), [s for s in shared if not torch.equal(sa[s][1], sb[s][1])]
    return shared


def test_every_site_loop_follows_the_sync_step(fault_run):
    for tag, log in fault_run["logs"].items():
        assert log["records"] and all(step == inner for _, step, inner, _, _ in log["records"]), tag


def test_a_site_cut_off_inside_an_exchange_is_dropped_and_healed_when_it_returns(fault_run):
    logs, held = fault_run["logs"], fault_run["held"]
    w0, w1 = _syncs(logs["w0"]), _syncs(logs["w1"])
    assert held["w1_continued"] == 20
    assert [w0[s][0] for s in range(10, 22, 2)] == [1] * 6  # w0 went on alone from the sync at 10 to 20
    steps = sorted(w1)
    assert steps[steps.index(8) + 1] == 22  # w1 last synced at 8, then was healed to w0's step 22
    assert _same_at(logs["w0"], logs["w1"], 22)


def test_a_lighthouse_back_within_the_quorum_timeout_is_survived(fault_run):
    logs, held = fault_run["logs"], fault_run["held"]
    assert held["lh_down"] == 26
    # the same processes made the sync at 28 together once it was back, and went on together
    assert all(_same_at(logs["w0"], logs["w1"], s) for s in (28, 30, 32))


def test_a_site_resumed_one_round_behind_its_peer_is_healed_to_the_peers_step(fault_run):
    """The fork that had this work reverted once: w1 restored step 32 and met w0 at w0's sync at step 34."""
    codes, logs, held = fault_run["codes"], fault_run["logs"], fault_run["held"]
    assert codes["w1"] == -signal.SIGKILL and held["w1_back"] == 33 and max(_syncs(logs["w1"])) == 32
    w0, w1b = logs["w0"], logs["w1b"]
    assert w1b["restored"] == 32  # its own last checkpoint came first...
    assert w1b["joined"] == 34  # ...then the peer's state and step (without the fix: 32, two steps behind for good)
    assert _same_at(w0, w1b, 34)
    assert _assert_same_where_together(w0, w1b) == list(range(34, held["lh_lost"] + 1, 2))


def test_a_lost_lighthouse_stops_each_site_with_one_line_naming_it_and_the_resume_is_identical(fault_run):
    codes, logs, outputs, held = fault_run["codes"], fault_run["logs"], fault_run["outputs"], fault_run["held"]
    assert held["lh_lost"] == 44
    for tag in ("w0", "w1b"):
        assert codes[tag] == 1
        assert max(_syncs(logs[tag])) == 44  # no sync after the Lighthouse was lost
        lines = [line for line in outputs[tag].splitlines() if line.strip()]
        assert sum(line.startswith("error:") for line in lines) == 1
        assert lines[-1].startswith("error: no quorum from the torchft Lighthouse http://localhost:") and "--resume" in lines[-1]
        assert not lines[-2].startswith(("  File", "Traceback", "TimeoutError"))  # one line, not a traceback
    w0c, w1c = logs["w0c"], logs["w1c"]
    assert codes["w0c"] == codes["w1c"] == 0
    assert w0c["restored"] == w1c["restored"] == w0c["joined"] == w1c["joined"] == 44  # their last save
    assert w0c["step"] == w0c["inner_step"] == w1c["step"] == w1c["inner_step"] == STEPS
    assert torch.equal(w0c["final"], w1c["final"])


def test_a_site_whose_theta_global_differs_is_healed_not_forked(fault_run):
    logs = fault_run["logs"]
    w0c, w1c = logs["w0c"], logs["w1c"]
    assert w0c["mismatches"] == w1c["mismatches"] == 1  # both saw the one-ulp difference once...
    assert _assert_same_where_together(w0c, w1c) == list(range(44, STEPS + 1, 2))  # ...and every sync after agrees
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
