"""
DDP vs DiLoCo vs Streaming DiLoCo over slow links: K sites as Linux network namespaces, each site's uplink
shaped with tc, one torchrun node (one DiLoCo worker) per site. Root only (it creates namespaces).

    sudo -E .venv/bin/python -m bench.bench_wan                     # 2 sites x {1 Gbit/s, 100, 10 Mbit/s} x 4 arms
    sudo -E .venv/bin/python -m bench.bench_wan --sites 4 --rates 10mbit
    sudo -E .venv/bin/python -m bench.bench_wan --quick             # micro model, 2 rates, a few steps (minutes)

Topology: a hub namespace holds a bridge; every site namespace holds one interface, wan0, the end of a veth
pair whose other end is a bridge port. Each site's wan0 egress goes through tbf at the link rate (plus netem
delay when the kernel has netem), so every site has an uplink of that rate and a site's downlink is fed by
the other sites' shaped uplinks. Nothing leaves the namespaces: they, their veths and their qdiscs are
created here and removed on exit, Ctrl-C, SIGTERM or failure; namespaces of an earlier run that was killed
are removed at start (names carry the owner's pid: nwan<pid>-...).

Per rate: a timed bulk transfer between two sites (python sockets) measures the shaped rate; then every arm
trains the same model on the same tokens (scripts.base_train, same seed), each site running
`torchrun --nnodes K --node_rank i` with gloo bound to wan0. Recorded per arm: val bpb against training time
(inner steps, the communication they block on and the final outer sync; evals excluded) and against the
bytes that crossed the link (tx_bytes of every wan0, read at each eval), tokens/s, the fraction of training
time the inner steps waited on the link, and a check that the bytes on the wire match the project's byte
accounting (the comm figures every rank saves in its checkpoint extras) within 5 % once TCP/IP/Ethernet
headers are taken off. Across arms: the common target (the worst final val bpb among the arms at that rate), the training
time each arm needed to reach it, and each DiLoCo arm's speedup over DDP.
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

from diloco.recipes import RECIPES, recipe_flags
from nanochat.checkpoint import checkpoint_dir
from nanochat.common import get_base_dir, write_atomic
from nanochat.dataset import list_parquet_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "nwan"  # every namespace this bench creates is nwan<pid>-<role>
IFACE = "wan0"  # a site's only link; gloo binds to it (GLOO_SOCKET_IFNAME)
SUBNET = "10.66.0"  # site i is SUBNET.(i+1)/24; private to the namespaces, so concurrent runs never collide
HEADER_BYTES = 66  # per packet on wan0: Ethernet 14 + IPv4 20 + TCP 20 + timestamps option 12
MICRO_MODEL = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
               "--device-batch-size", "4", "--eval-tokens", "2048"]

parser = argparse.ArgumentParser(description="DDP vs (Streaming) DiLoCo across K sites joined by shaped links",
                                 epilog="Any other flag is passed on to scripts.base_train for every arm.")
parser.add_argument("--sites", type=int, default=2, help="K sites = K torchrun nodes = K DiLoCo workers")
parser.add_argument("--rates", default="",
                    help="link rates, comma-separated (default 1gbit,100mbit,10mbit; quick: 100mbit,10mbit)")
parser.add_argument("--arms", default="ddp,diloco,streaming,streaming_codec", help="arms to run, in order")
parser.add_argument("--num-iterations", type=int, default=0, help="optimizer steps per arm (default 200; quick: 8)")
parser.add_argument("--eval-every", type=int, default=0, help="steps between val bpb evals (default 25; quick: 4)")
parser.add_argument("--diloco-h", type=int, default=0, help="inner steps between outer syncs (default 50; quick: 4)")
parser.add_argument("--fragments", type=int, default=0, help="Streaming DiLoCo fragments F (default 4; quick: 2)")
parser.add_argument("--overlap", type=int, default=0,
                    help="Streaming DiLoCo overlap tau >= 1 in inner steps, < H/F (default 5; quick: 1)")
parser.add_argument("--codec", default="int4", help="outer codec of the streaming_codec arm")
parser.add_argument("--diloco-recipe", choices=list(RECIPES), default="paper",
                    help="flags from diloco/recipes.py for the DiLoCo arms; its H is the default of --diloco-h; the DDP "
                         "arm, and so the common target's reference, stays the same")
parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay added by netem (when the kernel has it)")
parser.add_argument("--probe-seconds", type=float, default=2.0, help="length of the bulk transfer that measures each rate")
parser.add_argument("--quick", action="store_true", help="micro model, 2 rates, few steps: the harness in minutes")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--arm-timeout", type=float, default=0, help="seconds before a stuck arm fails (default 3600; quick: 300)")
parser.add_argument("--out", default="",
                    help="directory for wan.json, wan.md, the plot and logs (default: base_dir/bench/wan)")
args, train_args = parser.parse_known_args()

ARM_NAMES = ("ddp", "diloco", "streaming", "streaming_codec")
quick = args.quick
K = args.sites
N = args.num_iterations or (8 if quick else 200)
EVAL_EVERY = args.eval_every or (4 if quick else 25)
RECIPE = recipe_flags(args.diloco_recipe)
H = args.diloco_h or (int(RECIPE[RECIPE.index("--diloco-h") + 1]) if "--diloco-h" in RECIPE else 4 if quick else 50)
F = args.fragments or (2 if quick else 4)
TAU = args.overlap or (1 if quick else 5)  # Streaming DiLoCo needs tau < H/F
arm_names = [a for a in args.arms.split(",") if a]
for a in arm_names:
    if a not in ARM_NAMES:
        raise SystemExit(f"error: unknown arm {a!r}, expected some of {','.join(ARM_NAMES)}")
if K < 2:
    raise SystemExit("error: --sites must be >= 2 (one site has no link to shape)")


def parse_rate(text):
    """'10mbit' -> 10_000_000 bits/s (tc's units: kbit, mbit, gbit, decimal)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", text.strip().lower())
    if not m:
        raise SystemExit(f"error: cannot read link rate {text!r}: use e.g. 1gbit, 100mbit, 10mbit")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])


def rate_label(bps):
    for unit, scale in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps} bit/s"


rates = [parse_rate(r) for r in (args.rates or ("100mbit,10mbit" if quick else "1gbit,100mbit,10mbit")).split(",") if r]


# ---------------------------------------------------------------------------------------------------------
# Namespaces, links, shaping

def sh(*cmd, check=True):
    """Run a command of iproute2 (or `ip netns exec`); return stdout; raise with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name):
    """Run this thread inside namespace `name` (setns is per thread): a socket made here lives there for good."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bench_wan" in f.read()  # a recycled pid running something else does not count
    except OSError:
        return False


def kill_netns_processes(name):
    """SIGKILL what still runs in namespace `name` (only this bench puts processes there)."""
    for pid in sh("ip", "netns", "pids", name, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_netns(name):
    """Deleting a namespace destroys its interfaces (the veth peers with them) and their qdiscs."""
    kill_netns_processes(name)
    sh("ip", "netns", "del", name, check=False)


def remove_stale_namespaces():
    """Namespaces left by a run that was killed before its cleanup (SIGKILL, power loss): owner pid is gone."""
    removed = []
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(PREFIX + r"(\d+)-\w+", name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            delete_netns(name)
            removed.append(name)
    if removed:
        print(f"removed {len(removed)} namespaces left by an earlier run that was killed: {' '.join(removed)}")


class Sites:
    """K site namespaces on one bridge (in a hub namespace); site i is SUBNET.(i+1) on its interface wan0."""

    def __init__(self, k):
        self.hub = f"{PREFIX}{os.getpid()}-hub"
        self.names = [f"{PREFIX}{os.getpid()}-s{i}" for i in range(k)]
        self.created = []
        self.netem = False

    def addr(self, i):
        return f"{SUBNET}.{i + 1}"

    def create(self):
        for name in [self.hub, *self.names]:
            sh("ip", "netns", "add", name)
            self.created.append(name)
            with in_netns(name):  # no IPv6 chatter (router solicitations, DAD) in the byte counters
                for conf in ("all", "default"):
                    path = f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"
                    if os.path.exists(path):
                        with open(path, "w") as f:
                            f.write("1")
            sh("ip", "-n", name, "link", "set", "lo", "up")  # a site reaches its own address through lo
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            sh("ip", "-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", IFACE, "netns", name)
            sh("ip", "-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", name, "addr", "add", f"{self.addr(i)}/24", "dev", IFACE)
            sh("ip", "-n", name, "link", "set", IFACE, "up")
        # netem is a kernel module some kernels (e.g. many VMs' and sandboxes') do not ship: try it once
        probe = subprocess.run(["tc", "-n", self.names[0], "qdisc", "add", "dev", IFACE, "root", "netem", "delay", "1ms"],
                               capture_output=True, text=True)
        self.netem = probe.returncode == 0
        if self.netem:
            sh("tc", "-n", self.names[0], "qdisc", "del", "dev", IFACE, "root")

    def shape(self, bps, delay_ms):
        """tbf at `bps` on every site's egress; netem under it for the delay when the kernel has netem."""
        burst = max(32 * 1024, bps // 8 // 250)  # >= 4 ms of traffic: tbf needs a burst above one timer tick
        for name in self.names:
            sh("tc", "-n", name, "qdisc", "del", "dev", IFACE, "root", check=False)
            sh("tc", "-n", name, "qdisc", "add", "dev", IFACE, "root", "handle", "1:", "tbf", "rate", f"{bps}bit",
               "burst", str(burst), "latency", "100ms")
            if self.netem and delay_ms > 0:
                sh("tc", "-n", name, "qdisc", "add", "dev", IFACE, "parent", "1:1", "handle", "10:", "netem",
                   "delay", f"{delay_ms}ms", "limit", "100000")

    def counters(self):
        """[(tx_bytes, tx_packets)] of every site's wan0, read from sysfs inside its namespace."""
        out = []
        for name in self.names:
            stats = f"/sys/class/net/{IFACE}/statistics"
            text = sh("ip", "netns", "exec", name, "cat", f"{stats}/tx_bytes", f"{stats}/tx_packets")
            out.append(tuple(int(v) for v in text.split()))
        return out

    def destroy(self):
        for name in reversed(self.created):
            delete_netns(name)
        self.created = []


def probe_rate(sites, bps, seconds):
    """Timed bulk transfer site 0 -> site 1 over python sockets: the rate wan0 really carries (tx_bytes / time)."""
    with in_netns(sites.names[1]):
        server = socket.create_server((sites.addr(1), 0))
    with in_netns(sites.names[0]):
        client = socket.socket()
    port = server.getsockname()[1]
    client.connect((sites.addr(1), port))
    conn, _ = server.accept()
    received = [0]

    def receive():
        while chunk := conn.recv(1 << 20):
            received[0] += len(chunk)
        conn.sendall(b"k")  # everything arrived

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    size, chunk = int(bps / 8 * seconds), memoryview(bytes(1 << 20))
    before = sites.counters()[0]
    t0 = time.perf_counter()
    for offset in range(0, size, len(chunk)):
        client.sendall(chunk[:size - offset])
    client.shutdown(socket.SHUT_WR)
    ack = client.recv(1)
    elapsed = time.perf_counter() - t0
    after = sites.counters()[0]
    reader.join(timeout=10)
    for s in (client, conn, server):
        s.close()
    assert ack == b"k" and received[0] == size, f"bulk transfer lost data: {received[0]:,} of {size:,} bytes"
    wire = after[0] - before[0]
    return {"payload_bytes": size, "wire_bytes": wire, "seconds": elapsed, "wire_bps": wire * 8 / elapsed,
            "goodput_bps": size * 8 / elapsed, "ratio_to_cap": wire * 8 / elapsed / bps}


# ---------------------------------------------------------------------------------------------------------
# One training arm across the K sites

def arm_flags(name):
    if name == "ddp":
        return ["--sync", "ddp"]
    flags = ["--sync", "diloco", *RECIPE, "--diloco-h", str(H), "--diloco-workers", str(K)]  # the arm's flags win
    if name.startswith("streaming"):
        flags += ["--diloco-fragments", str(F), "--diloco-overlap", str(TAU)]
    if name == "streaming_codec":
        flags += ["--outer-compression", args.codec]
    return flags


def arm_label(name):
    recipe = "" if args.diloco_recipe == "paper" else f" {args.diloco_recipe}"
    return {"ddp": "DDP", "diloco": f"DiLoCo H={H}{recipe}", "streaming": f"Streaming F={F} tau={TAU}",
            "streaming_codec": f"Streaming F={F} tau={TAU} {args.codec}"}[name]


def read_records(path, offset):
    """Complete JSON lines of metrics.jsonl from byte `offset` on; returns (records, new offset)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def run_arm(sites, bps, name, port, procs):
    """Train one arm on all sites at once; returns its figures. `procs` is shared with the cleanup."""
    tag = f"wan_{bps}_{name}"
    ckpt = checkpoint_dir("base", tag)
    shutil.rmtree(ckpt, ignore_errors=True)  # never read a previous run's figures
    common = ["--preset", "tiny", "--num-iterations", str(N), "--eval-every", str(EVAL_EVERY), "--sample-every", "0",
              "--save-every", "0", "--seed", str(args.seed), "--model-tag", tag, "--device-type", "cpu",
              "--total-batch-size", str(256 * K if quick else 8192), "--collective-timeout", "1800"]
    if quick:
        common += MICRO_MODEL
    elif 8192 % (16 * 256 * K):
        common += ["--device-batch-size", str(8192 // (256 * K))]  # same tokens per step for every K
    env = dict(os.environ, GLOO_SOCKET_IFNAME=IFACE, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = [os.path.join(out_dir, "logs", f"{tag}_site{i}.log") for i in range(K)]
    before = sites.counters()
    t_launch = time.perf_counter()
    for i, ns in enumerate(sites.names):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", f"--nnodes={K}",
               "--nproc_per_node=1", f"--node_rank={i}", f"--master_addr={sites.addr(0)}", f"--master_port={port}",
               "-m", "scripts.base_train", *common, *arm_flags(name), *train_args]
        with open(logs[i], "w") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # Ctrl-C reaches us, we stop them
    running = procs[-K:]
    metrics_path, offset, evals = os.path.join(ckpt, "metrics.jsonl"), 0, []
    deadline = t_launch + (args.arm_timeout or (300 if quick else 3600))
    while True:
        done = all(p.poll() is not None for p in running)
        records, offset = read_records(metrics_path, offset)
        for r in records:
            if "val_bpb" in r:  # the link counters at the moment the eval was logged
                now = sites.counters()
                r["wire_bytes"] = sum(a[0] - b[0] for a, b in zip(now, before))
                r["wall_seconds"] = time.perf_counter() - t_launch
                evals.append(r)
        if done:
            break
        if time.perf_counter() > deadline or any(p.poll() not in (None, 0) for p in running):
            break  # a site failed or hung: its peers would wait for the collective timeout
        time.sleep(0.2)
    wall = time.perf_counter() - t_launch
    if any(p.poll() is None for p in running):
        for ns in sites.names:  # torchrun's workers run in sessions of their own: take everything in the sites
            kill_netns_processes(ns)
        for p in running:
            p.wait()
    after = sites.counters()
    meta_path = os.path.join(ckpt, f"step_{N:06d}", "meta.json")  # written last, atomically: complete if present
    if not os.path.exists(meta_path):
        for i, p in enumerate(running):
            if p.returncode != 0:
                with open(logs[i]) as f:
                    sys.stderr.write(f"--- site {i} ({logs[i]}) ---\n{f.read()[-3000:]}\n")
        why = "timed out" if time.perf_counter() > deadline else f"exit codes {[p.returncode for p in running]}"
        raise RuntimeError(f"arm {name} at {rate_label(bps)} failed ({why}): see {os.path.dirname(logs[0])}")
    with open(meta_path) as f:
        meta = json.load(f)
    comm_by_rank = [torch.load(os.path.join(ckpt, f"step_{N:06d}", f"extra_rank{i}.pt"), map_location="cpu",
                               weights_only=False)["comm"] for i in range(K)]
    with open(metrics_path) as f:
        last_step = [r for r in map(json.loads, f) if "loss" in r][-1]

    # Bytes: what each site's wan0 sent, headers off, against what the ranks' accounting says they sent
    tx = [a[0] - b[0] for a, b in zip(after, before)]
    packets = [a[1] - b[1] for a, b in zip(after, before)]
    payload = [t - HEADER_BYTES * p for t, p in zip(tx, packets)]
    accounted_site = [sum(s["bytes"] for s in stats.values()) for stats in comm_by_rank]
    accounted = sum(accounted_site)
    error = sum(payload) / accounted - 1 if accounted else float("inf")
    # Time (rank 0's figures throughout). DDP blocks in its gradient all-reduce every step (its inner group
    # spans the sites); DiLoCo blocks where sync.wait_seconds says, an overlapped exchange only where it is
    # still running when due. DiLoCo's last outer sync (the end of the schedule: with fragments, every one
    # with inner steps since its last exchange) runs before the final eval, outside train_seconds: it is
    # training time all the same, so it is added to the arm's time and to its final eval's.
    if name == "ddp":
        wait, final_sync = comm_by_rank[0].get("inner", {}).get("seconds", 0.0), 0.0
    else:
        wait = meta["outer_wait_seconds"]
        final_sync = wait - last_step["outer_wait_seconds"]
    seconds = meta["train_seconds"] + final_sync
    curve = [{"step": r["step"], "tokens": r["tokens"], "val_bpb": r["val_bpb"],
              "train_seconds": r["train_seconds"] + (final_sync if r["step"] == N else 0.0),
              "wall_seconds": r["wall_seconds"], "wire_bytes": r["wire_bytes"],
              "accounted_bytes": r["inner_bytes"] + r["outer_bytes"]} for r in evals]
    return {
        "arm": name, "label": arm_label(name), "rate_bps": bps, "flags": arm_flags(name), "steps": N,
        "tokens": meta["tokens"], "val_bpb": meta["val_bpb"], "train_seconds": seconds,
        "final_sync_seconds": final_sync, "wall_seconds": wall, "tokens_per_s": meta["tokens"] / seconds,
        "wait_seconds": wait, "wait_frac": wait / seconds,
        "inner_bytes": meta["inner_bytes"], "outer_bytes": meta["outer_bytes"],
        "accounted_bytes": accounted, "accounted_bytes_per_site": accounted_site, "comm_by_rank": comm_by_rank,
        "tx_bytes_per_site": tx, "tx_packets_per_site": packets, "tx_bytes": sum(tx), "payload_bytes": sum(payload),
        "bytes_error": error, "bytes_check": "PASS" if abs(error) <= 0.05 else "FAIL", "evals": curve,
    }


def time_to_target(evals, target, interpolate):
    """Training seconds at which val bpb first reaches `target`; None if never. The untrained model (step 0)
    does not count: early steps can raise val bpb above it. DDP's weights change every step, so its time is
    linear between evals; DiLoCo's evals show theta_global, which changes only at outer syncs, so its time is
    the first eval at or below the target (exact when evals fall on syncs; with fragments, an upper bound)."""
    prev = None
    for e in evals:
        if e["val_bpb"] <= target + 1e-9 and e["step"] > 0:
            if not interpolate or prev is None or prev["val_bpb"] <= target:
                return e["train_seconds"]
            frac = (prev["val_bpb"] - target) / (prev["val_bpb"] - e["val_bpb"])
            return prev["train_seconds"] + frac * (e["train_seconds"] - prev["train_seconds"])
        prev = e
    return None


# ---------------------------------------------------------------------------------------------------------
# Report

def fmt_seconds(t):
    return "-" if t is None else f"{t:,.0f}"


def fmt_speedup(x):
    return "-" if x is None else f"{x:.2f}x"


def report(results, probes, netem):
    first = results[0]
    lines = [f"{K} sites (network namespaces; one torchrun node and one DiLoCo worker each), "
             f"{'micro model (--quick)' if quick else 'tiny preset'}, {N} steps x {first['tokens'] // N:,} tokens = "
             f"{first['tokens']:,} tokens per arm, eval every {EVAL_EVERY} steps, DiLoCo H={H}, Streaming F={F} "
             f"tau={TAU}, seed {args.seed}, {os.cpu_count()} CPU cores shared by all sites.",
             "Latency: " + (f"netem adds {args.delay_ms:g} ms one way on each site's uplink." if netem and args.delay_ms > 0
                            else "not emulated (this kernel has no netem qdisc): the links are rate-limited only."),
             "", "| link cap | measured (bulk TCP, wire bytes) | ratio | check |", "| --- | ---: | ---: | --- |"]
    for bps, p in probes.items():
        lines.append(f"| {rate_label(bps)} | {p['wire_bps'] / 1e6:,.1f} Mbit/s | {p['ratio_to_cap']:.3f} | {p['check']} |")
    lines += ["", "| link | arm | final val bpb | train s | s to target | speedup vs DDP | tok/s | waited on link "
              "| bytes on the wire | accounted | payload vs accounted |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {rate_label(r['rate_bps'])} | {r['label']} | {r['val_bpb']:.4f} | {r['train_seconds']:,.0f} | "
                     f"{fmt_seconds(r['seconds_to_target'])} | {fmt_speedup(r['speedup_vs_ddp'])} | "
                     f"{r['tokens_per_s']:,.0f} | {100 * r['wait_frac']:.1f}% | {r['tx_bytes']:,} | "
                     f"{r['accounted_bytes']:,} | {100 * r['bytes_error']:+.2f}% {r['bytes_check']} |")
    lines += ["", "Common target per link: the worst final val bpb among the arms at that rate ("
              + ", ".join(f"{rate_label(b)}: {t:.4f}" for b, t in targets.items()) + "). 'train s': training "
              "time (inner steps, the communication they block on, DiLoCo's final outer sync; evals excluded); "
              "'s to target': the same clock until val bpb first reaches the target (DDP: linear between evals; "
              "DiLoCo: the first eval at or below it, as theta_global only moves at outer syncs). 'waited on link': "
              "share of training time the inner steps were blocked on communication across sites (DDP: its gradient "
              "all-reduce, which also absorbs the peers' compute imbalance; DiLoCo: sync.wait_seconds). "
              "'bytes on the wire': tx_bytes of every site's wan0, summed; "
              f"'payload vs accounted': those bytes less {HEADER_BYTES} header bytes per packet, against the bytes the "
              "ranks' own accounting says they sent (all process groups), within 5 %."]
    return lines


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = dict(zip(ARM_NAMES, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    styles = ["-", "--", ":", "-."]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        style = styles[rates.index(r["rate_bps"]) % len(styles)]
        evals = [e for e in r["evals"] if e["step"] > 0]  # step 0 sits at t = 0, off a log axis
        label = f"{r['label']}, {rate_label(r['rate_bps'])}"
        ax_t.plot([e["train_seconds"] for e in evals], [e["val_bpb"] for e in evals], style, color=colors[r["arm"]],
                  marker=".", label=label)
        ax_b.plot([e["wire_bytes"] / 1e6 for e in evals], [e["val_bpb"] for e in evals], style, color=colors[r["arm"]],
                  marker=".", label=label)
    ax_t.set(xscale="log", xlabel="training seconds (inner steps + blocking communication)", ylabel="val bpb",
             title=f"val bpb vs time, {K} sites")
    ax_b.set(xscale="log", xlabel="MB on the wire (all sites' tx_bytes)", ylabel="val bpb",
             title="val bpb vs bytes on the wire")
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 100, not 10^2
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Main

if os.geteuid() != 0:
    raise SystemExit("error: bench_wan needs root: it creates network namespaces and shapes their links with tc. "
                     "Run `sudo -E .venv/bin/python -m bench.bench_wan`")
for tool in ("ip", "tc"):
    if not shutil.which(tool):
        raise SystemExit(f"error: `{tool}` not found: install iproute2 (apt-get install -y iproute2)")
base_dir = get_base_dir()
if not list_parquet_files() or not os.path.exists(os.path.join(base_dir, "tokenizer", "token_bytes.pt")):
    raise SystemExit(f"error: no pretraining shards or tokenizer in {base_dir}: run `python -m nanochat.dataset offline` "
                     "(or `download`), then `python -m scripts.tok_train --vocab-size 4096`")
out_dir = args.out or os.path.join(base_dir, "bench", "wan")
os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)


def on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally below, like Ctrl-C


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGHUP, on_signal)
sites, procs = Sites(K), []
results, probes, targets = [], {}, {}
try:
    remove_stale_namespaces()
    sites.create()
    print(f"{K} sites: namespaces {' '.join(sites.names)} on a bridge in {sites.hub}; " +
          (f"netem delay {args.delay_ms:g} ms one way" if sites.netem and args.delay_ms > 0 else
           "latency is not emulated (no netem qdisc in this kernel): rate limit only"), flush=True)
    for r_index, bps in enumerate(rates):
        sites.shape(bps, args.delay_ms)
        p = probe_rate(sites, bps, args.probe_seconds)
        p["check"] = "PASS" if abs(p["ratio_to_cap"] - 1) <= 0.15 else "FAIL"
        probes[bps] = p
        print(f"{rate_label(bps)}: bulk transfer {p['wire_bps'] / 1e6:,.1f} Mbit/s on the wire "
              f"({p['ratio_to_cap']:.3f} of the cap: {p['check']})", flush=True)
        for a_index, name in enumerate(arm_names):
            print(f"  {arm_label(name)}: {N} steps on {K} sites ...", flush=True)
            port = 29500 + r_index * len(ARM_NAMES) + a_index  # a fresh port per arm: no TIME_WAIT surprises
            r = run_arm(sites, bps, name, port, procs)
            results.append(r)
            print(f"    val bpb {r['val_bpb']:.4f} | {r['train_seconds']:,.1f} s training, {r['wall_seconds']:,.0f} s wall | "
                  f"{r['tokens_per_s']:,.0f} tok/s | waited {100 * r['wait_frac']:.1f}% | {r['tx_bytes']:,} B on the "
                  f"wire vs {r['accounted_bytes']:,} accounted ({100 * r['bytes_error']:+.2f}% payload: "
                  f"{r['bytes_check']})", flush=True)
except KeyboardInterrupt:
    raise SystemExit("interrupted")  # after the finally below has cleaned up; a traceback would say nothing more
finally:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    sites.destroy()  # kills what still runs inside the namespaces first
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # left the namespace somehow: its session goes instead
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    left = [line.split()[0] for line in sh("ip", "netns", "list").splitlines()
            if line.startswith(f"{PREFIX}{os.getpid()}-")]
    if left:
        print(f"warning: could not remove namespaces {' '.join(left)}: `ip netns del NAME` removes them", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

# Common target per rate, time to it, speedup over DDP
for bps in rates:
    at_rate = [r for r in results if r["rate_bps"] == bps]
    targets[bps] = max(r["val_bpb"] for r in at_rate)
    for r in at_rate:
        r["target_bpb"] = targets[bps]
        r["seconds_to_target"] = time_to_target(r["evals"], targets[bps], interpolate=r["arm"] == "ddp")
    ddp_t = next((r["seconds_to_target"] for r in at_rate if r["arm"] == "ddp"), None)
    for r in at_rate:
        r["speedup_vs_ddp"] = ddp_t / r["seconds_to_target"] if ddp_t and r["seconds_to_target"] else None

lines = report(results, probes, sites.netem)
by = {(r["rate_bps"], r["arm"]): r for r in results}
slow = 10**7
if K == 2 and slow in rates:  # the targets: 10 Mbit/s between 2 sites
    checks = []
    if (slow, "ddp") in by and (slow, "diloco") in by:
        x = by[(slow, "diloco")]["speedup_vs_ddp"] or 0
        checks.append(f"DiLoCo reached the target {x:.2f}x sooner than DDP (goal >= 5x: {'met' if x >= 5 else 'NOT met'})")
    if (slow, "diloco") in by and (slow, "streaming") in by:
        t_d, t_s = by[(slow, "diloco")]["seconds_to_target"], by[(slow, "streaming")]["seconds_to_target"]
        x = t_d / t_s if t_d and t_s else 0
        checks.append(f"Streaming DiLoCo {x:.2f}x sooner than plain DiLoCo (goal >= 1.5x: {'met' if x >= 1.5 else 'NOT met'})")
    if checks:
        lines += ["", "At 10 Mbit/s between 2 sites: " + "; ".join(checks) + "."]
table = "\n".join(lines)
print("\n" + table)
plot_path = os.path.join(out_dir, "wan_bpb_vs_time.png")
plot(results, plot_path)
write_atomic(os.path.join(out_dir, "wan.md"), f"# WAN benchmark\n\n![val bpb vs time](wan_bpb_vs_time.png)\n\n{table}\n")
write_atomic(os.path.join(out_dir, "wan.json"), json.dumps(
    {"sites": K, "rates_bps": rates, "arms": arm_names, "num_iterations": N, "eval_every": EVAL_EVERY, "diloco_h": H,
     "fragments": F, "overlap": TAU, "codec": args.codec, "diloco_recipe": args.diloco_recipe, "quick": quick, "seed": args.seed,
     "netem": sites.netem, "delay_ms": args.delay_ms if sites.netem else 0, "train_args": train_args,
     "probes": {str(b): p for b, p in probes.items()}, "targets": {str(b): t for b, t in targets.items()},
     "results": results}, indent=2))
print(f"\nwrote {plot_path}, wan.md and wan.json in {out_dir}")
failed = [f"{rate_label(b)} shaping" for b, p in probes.items() if p["check"] == "FAIL"] + \
         [f"{r['arm']} at {rate_label(r['rate_bps'])} bytes" for r in results if r["bytes_check"] == "FAIL"]
if failed:
    raise SystemExit(f"error: checks failed: {', '.join(failed)} (see the table)")
