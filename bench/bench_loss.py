"""
The training loss's memory: peak-RSS rise and time of one forward + backward of a small model at a large vocab,
where the (tokens, vocab) fp32 logits dominate (CPU; a proxy for the loss's transient on the GPU).

    python -m bench.bench_loss                                # depth 1, vocab 65,536, 8 x 2048 tokens
    python -m bench.bench_loss --chunk-rows 8192,2048,1024    # the loss's chunk size (rows of logits at once)

Each measurement runs in a fresh process: the model and a batch are built, then ru_maxrss (the process's peak
resident set) is read before and after one forward + backward; the rise is the step's transient (logits, their
gradients, the weights' gradients; the model's own activations are small at depth 1). Then --repeats more steps
are timed and the best is kept.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(depth, vocab_size, batch_size, sequence_len, chunk_rows, repeats):
    """In this process: {"rise": bytes of peak RSS added by the first forward + backward, "seconds": best step}."""
    import torch
    import nanochat.gpt as gpt
    torch.manual_seed(0)
    if chunk_rows:
        gpt.LOSS_CHUNK_BYTES = chunk_rows * 4 * vocab_size
    model = gpt.GPT(gpt.config_from_depth(depth, vocab_size, sequence_len))
    model.init_weights()
    idx = torch.randint(0, vocab_size, (batch_size, sequence_len))
    targets = torch.randint(0, vocab_size, (batch_size, sequence_len))
    before = peak_rss_bytes()
    model(idx, targets).backward()
    rise = peak_rss_bytes() - before
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(idx, targets).backward()
        best = min(best, time.perf_counter() - t0)
    return {"rise": rise, "seconds": best, "chunk_rows": gpt.LOSS_CHUNK_BYTES // (4 * vocab_size)}


def main():
    parser = argparse.ArgumentParser(description="Peak-RSS rise and time of one forward + backward (the loss's transient)")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--chunk-rows", type=str, default="", help="comma-separated chunk sizes in tokens (default: the code's, "
                        "nanochat.gpt.LOSS_CHUNK_BYTES of fp32 logits)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.depth, args.vocab_size, args.batch_size, args.sequence_len)
    if args.child:
        print(json.dumps(measure(*shape, int(args.chunk_rows or 0), args.repeats)))
        return
    print(f"depth {args.depth}, vocab {args.vocab_size:,}, {args.batch_size} x {args.sequence_len} tokens, one thread")
    print(f"{'chunk rows':>10} {'peak RSS rise':>14} {'fwd+bwd s':>10}")
    for rows in (args.chunk_rows.split(",") if args.chunk_rows else [""]):
        cmd = [sys.executable, "-m", "bench.bench_loss", "--child", "--chunk-rows", rows, "--repeats", str(args.repeats),
               "--depth", str(args.depth), "--vocab-size", str(args.vocab_size), "--batch-size", str(args.batch_size),
               "--sequence-len", str(args.sequence_len)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{rows or 'default':>10} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['chunk_rows']:>10,} {r['rise'] / 2 ** 30:>10.2f} GiB {r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
