"""One elastic DiLoCo site for the fault tests (tests/test_elastic_faults.py), run as its own process:

    python -m tests.helpers_elastic NAME LIGHTHOUSE OUT_DIR [--resume] [--kill-at S] [--pause-at S] [--hold S:GATE]...

A toy model trained by the loop base_train runs, in small: restore (--resume) -> sync.join() -> the step from
loop_step() after every sync.step(), a checkpoint every SAVE steps (atomic), stop at STEPS. Faults it makes itself,
at exact points: --kill-at S (SIGKILL once its loop is at step S, mid-round), --pause-at S (SIGSTOP inside the outer
all-reduce of the sync at inner step S: the test sends SIGCONT), --fork (after the restore, theta_global is nudged
by one ulp: a site that silently went another way). --hold S:GATE waits at step S until OUT_DIR/GATE exists
(S:GATE:together: at the first step from S on right after an outer sync with a peer), writing OUT_DIR/holding_GATE;
--release GATE creates OUT_DIR/GATE just before joining, --wait-for GATE
waits for it there; --start-after GATE waits for it before anything else. It writes OUT_DIR/TAG.pt after every outer sync:
records (wall time, loop step, sync step, workers, theta_global), and at the end the final theta_global."""

import argparse
import importlib
import os
import signal
import time

import torch
import torch.nn as nn

from diloco import make_sync
from diloco.sync import WorkerGroups
from nanochat.train_loop import loop_step
from tests.test_diloco import GroupSGD, sync_args, toy_batch, toy_model

H, SAVE, STEPS = 2, 4, 60
COLLECTIVE_TIMEOUT = 8  # seconds: also how long a lost Lighthouse is asked again before the site stops


def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("lighthouse")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--fork", action="store_true")
    parser.add_argument("--hold", action="append", default=[])
    parser.add_argument("--release", default="")
    parser.add_argument("--wait-for", default="")
    parser.add_argument("--tag", default="", help="name of the record file (default: the site's name)")
    parser.add_argument("--start-after", default="", help="wait for OUT_DIR/GATE before anything (started early, so "
                                                          "that its imports overlap the run)")
    a = parser.parse_args()
    importlib.import_module("torchft.manager")  # before --start-after: with torch, the slow part of starting a site
    while a.start_after and not os.path.exists(os.path.join(a.out, a.start_after)):
        time.sleep(0.01)
    torch.set_num_threads(1)
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", str(H), "--outer-lr", "0.7", "--elastic", "torchft",
                     "--lighthouse", a.lighthouse, "--replica-id", a.name, "--collective-timeout", str(COLLECTIVE_TIMEOUT),
                     "--peer-timeout", "2")
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1)], WorkerGroups(1, 1, 0, 0, None, None))
    ckpt, log = os.path.join(a.out, f"{a.name}.ckpt"), os.path.join(a.out, f"{a.tag or a.name}.pt")
    step = restored = 0
    if a.resume:  # as base_train: the own checkpoint first, then the join (a newer peer heals it)
        saved = torch.load(ckpt)
        model.load_state_dict(saved["model"])
        sync.load_state_dict(saved["sync"])
        step = restored = saved["step"]
    if a.fork:
        with torch.no_grad():
            theta = sync.fragments[0].theta[0].view(-1)
            theta[0] = torch.nextafter(theta[0], torch.tensor(float("inf")))
    pause = a.pause_at
    if pause >= 0:
        exchange = sync.membership._allreduce

        def pausing_allreduce(*args):
            if sync.inner_step == pause:
                os.kill(os.getpid(), signal.SIGSTOP)  # cut off inside the exchange, until the test's SIGCONT
            return exchange(*args)

        sync.membership._allreduce = pausing_allreduce
    holds = sorted((int(h.split(":")[0]), h.split(":")[1], h.endswith(":together")) for h in a.hold)
    if a.release:
        open(os.path.join(a.out, a.release), "w").close()
    while a.wait_for and not os.path.exists(os.path.join(a.out, a.wait_for)):
        time.sleep(0.01)
    sync.join()
    step = joined = loop_step(step, sync)
    records, syncs = [], sync.num_syncs

    def record():
        theta = torch.cat([t.reshape(-1) for t in sync.fragments[0].theta]).clone()
        records.append((time.time(), step, sync.inner_step, sync.membership.workers(), theta))
        atomic_save({"restored": restored, "joined": joined, "records": records,
                     "mismatches": sync.membership.mismatches}, log)

    record()
    while step < STEPS:
        if holds and step >= holds[0][0] and (not holds[0][2] or (step % H == 0 and sync.membership.workers() > 1)):
            _, gate, _ = holds.pop(0)
            atomic_save(step, os.path.join(a.out, f"holding_{gate}"))
            while not os.path.exists(os.path.join(a.out, gate)):
                time.sleep(0.01)
        x, y = toy_batch(int(a.name[-1]), step)
        nn.functional.mse_loss(model(x), y).backward()
        sync.step()
        step = loop_step(step + 1, sync)
        if sync.num_syncs != syncs:
            syncs = sync.num_syncs
            record()
        if step % SAVE == 0:
            atomic_save({"model": model.state_dict(), "sync": sync.state_dict(), "step": step}, ckpt)
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)
    sync.synchronize()
    theta = torch.cat([t.reshape(-1) for t in sync.fragments[0].theta])
    atomic_save({"restored": restored, "joined": joined, "records": records, "mismatches": sync.membership.mismatches,
                 "final": theta, "step": step, "inner_step": sync.inner_step}, log)
    sync.membership.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
