"""Shared plumbing: base directory, logging, device and torchrun/process-group setup."""

import contextlib
import datetime
import hashlib
import logging
import os
import sys

import torch
import torch.distributed as dist

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
logger = logging.getLogger("nanochat")


class UsageError(ValueError):
    """A run asked for something that cannot work as given (a flag value, a checkpoint, the hardware); the message
    says what to do instead. Library code raises it; scripts print it as one line and exit 1 (usage_errors)."""


@contextlib.contextmanager
def usage_errors():
    """A script's command line: a UsageError ends the process with its one line on stderr, exit status 1."""
    try:
        yield
    except UsageError as e:
        rank = int(os.environ.get("RANK", 0))
        print(("" if rank == 0 else f"rank {rank}: ") + f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def get_base_dir():
    """Every artifact (data, tokenizer, checkpoints, evals, report) lives under this one directory."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MiB pieces (archives and checkpoints can be GiBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path, data):
    """Write `data` (str, bytes, or a function that writes to the open binary file) to `path` through a temporary
    file beside it and a rename, so a reader, or a run killed mid-write, never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def collective_timeout():
    """Seconds a collective may wait before the process group aborts (a dead peer must not hang us forever)."""
    return float(os.environ.get("NANOCHAT_COLLECTIVE_TIMEOUT", "600"))


def compute_init(device_type=None, seed=1337, timeout_s=None):
    """Set up torch for this process. Returns (ddp, rank, local_rank, world_size, device).

    Under torchrun the default process group is created (nccl on CUDA, gloo on CPU) with a timeout so a
    dead peer surfaces as an error rather than a hang. Plain `python` runs as a single process.
    """
    device_type = device_type or autodetect_device_type()
    assert device_type in ("cuda", "mps", "cpu"), f"unknown device type {device_type}"
    ddp, rank, local_rank, world_size = get_dist_info()
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.manual_seed(seed)
    if device_type == "cpu" and ddp:
        # several processes share the cores; one thread each avoids oversubscription
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if ddp:
        timeout = datetime.timedelta(seconds=timeout_s or collective_timeout())
        if device_type == "cuda":
            index, backend = cuda_placement(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                            torch.cuda.device_count())
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
            if backend == "gloo" and local_rank == 0:
                print(f"note: {os.environ.get('LOCAL_WORLD_SIZE')} ranks share {torch.cuda.device_count()} GPU(s): gloo "
                      "(nccl refuses two ranks on one device); for checks, not for speed", flush=True)
            dist.init_process_group(backend=backend, timeout=timeout,
                                    **({"device_id": device} if backend == "nccl" else {}))
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo", timeout=timeout)
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def cuda_placement(local_rank, local_world_size, device_count):
    """(GPU index, backend) of a rank: one GPU per rank over nccl; with more ranks than GPUs (a one-GPU check of
    several DiLoCo workers) they take turns round the GPUs over gloo, whose all_reduce and broadcast accept CUDA
    tensors (torch.distributed's backend table), while nccl refuses two ranks on one device."""
    if local_world_size <= device_count:
        return local_rank, "nccl"
    return local_rank % device_count, "gloo"


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        # every rank reaches this point before any tears down: a rank that destroys its process group
        # while a peer is still using the connection can abort the peer at exit ("terminate called...")
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code=0):
    """End a script's process without the interpreter's teardown. Under torchrun, a process that used gloo and
    pyarrow sometimes aborts in a native static destructor after all Python code is done ("terminate called
    without an active exception", seen ~1 run in 20 on a loaded 2-core machine), which torchrun reports as a
    failed run. Everything is written and closed by the time scripts call this."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def autocast_context(device_type):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 matmuls are slow and not bit-stable)."""
    import contextlib
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_synchronize(device_type):
    """Wait for the GPU's queued work (for timings); not DiLoCo's sync.synchronize()."""
    if device_type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device):
    """bf16 dense peak FLOP/s for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


class DummyWandb:
    """Stands in for wandb when no --run is given."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name, project, config, master_process):
    if not run_name or run_name == "dummy" or not master_process:
        return DummyWandb()
    import wandb
    return wandb.init(project=project, name=run_name, config=config)
