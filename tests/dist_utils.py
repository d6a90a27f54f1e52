"""Run a function on N gloo processes on this machine (CPU), collecting each rank's return value."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, env, cwd):
    os.environ.clear()  # the caller's environment and folder, not the fork server's from when it started
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(cwd)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, out_dir, *args, timeout=120, check=True):
    """fn(rank, world_size, *args) must be importable (module level). Returns the list of results by rank
    (None for a rank that wrote none). Every process is joined: a failing rank does not kill the others,
    so a test can see how the survivors behaved. With check=True any non-zero exit raises."""
    ctx = mp.get_context("forkserver")
    # every rank forks from one server process that imported torch (and torch._dynamo, which the first optimizer
    # imports) once for the whole session, instead of importing it afresh: seconds saved per run
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "nanochat.gpt", "diloco"])
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, str(out_dir), fn, args, dict(os.environ), os.getcwd()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if check and any(c != 0 for c in codes):
        raise RuntimeError(f"distributed run failed, exit codes by rank: {codes}")
    paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
    return [torch.load(p) if os.path.exists(p) else None for p in paths]
