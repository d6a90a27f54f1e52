"""A tiny corpus + tokenizer in a test's base dir, and a torchrun launcher for the training scripts."""

import json
import os
import subprocess
import sys

from tests.dist_utils import free_port
from tests.helpers_tiny import synthetic_conversations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# small enough to train for a handful of steps in seconds on 2 processes
TINY_MODEL = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
              "--device-batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "1024", "--sample-every", "0"]


def make_tiny_corpus(base_dir, n=3000, vocab_size=512):
    """Build the offline corpus format from synthetic conversations (row groups of 32 documents, so every
    rank has several) and train a tokenizer on it."""
    from nanochat.dataset import build_offline, parquets_iter_batched
    from nanochat.tokenizer import Tokenizer
    convs = [{"id": f"conv{i}", "conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                                  for m in c["messages"]]}
             for i, c in enumerate(synthetic_conversations(n, seed=1))]
    build_offline(conversations=convs, chars_per_shard=60_000, row_group_size=32)
    texts = [t for docs in parquets_iter_batched("train") for t in docs]
    Tokenizer.train_from_iterator(iter(texts), vocab_size).save(os.path.join(str(base_dir), "tokenizer"))


def torchrun(module, args, nproc=2, env=None, timeout=300):
    """Run `python -m module args` under torchrun with nproc CPU processes; returns stdout, raises with the log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", module, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        with open(os.path.join(os.environ.get("NANOCHAT_BASE_DIR", "/tmp"), "torchrun_failure.log"), "w") as f:
            f.write(proc.stdout + "\n" + proc.stderr)
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
