"""
Optimizer step time for a base_train preset's parameter shapes: the median of --steps timed steps of Muon and of
AdamW (as model.setup_optimizers builds them), after a few untimed ones, on random gradients. Whatever
`nanochat` is importable is measured, so an older version is timed by pointing PYTHONPATH at its export:

    python -m bench.bench_optim                                   # tiny preset, CPU, one thread
    git archive REV | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python bench/bench_optim.py   # the same, at REV

On CUDA the step ends with a device synchronise, and Muon's step is compiled there (the first steps compile).
"""

import argparse
import statistics
import time

import torch

from nanochat.gpt import config_from_depth, gpt_on_meta

SHAPES = {"tiny": dict(depth=2, head_dim=64, max_seq_len=256), "d20": dict(depth=20, head_dim=128, max_seq_len=2048)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = SHAPES[args.preset]
    config = config_from_depth(shape["depth"], args.vocab_size, shape["max_seq_len"], head_dim=shape["head_dim"])
    model = gpt_on_meta(config)
    model.to_empty(device=args.device)
    model.init_weights()
    adamw, muon = model.setup_optimizers()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    for name, opt in (("muon", muon), ("adamw", adamw)):
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        n = sum(p.numel() for g in opt.param_groups for p in g["params"])
        shapes = len({tuple(p.shape) for g in opt.param_groups for p in g["params"]})
        print(f"{name:<6} {args.preset} on {args.device} ({args.threads} thread(s)): {n:,} parameters, {shapes} shapes "
              f"| median step {1000 * statistics.median(times):.3f} ms over {args.steps} "
              f"(min {1000 * min(times):.3f}, max {1000 * max(times):.3f})")


if __name__ == "__main__":
    main()
