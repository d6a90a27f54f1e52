"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size."""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of next-token nats over the sum of target bytes, in bits. Special-token targets (0 bytes) and
    ignored targets (-1) count for neither. Summed over ranks when a process group exists."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)[:2]
        loss = model(x, y, loss_reduction="none").view(-1).to(token_bytes.device)
        y = y.view(-1).to(token_bytes.device)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([total_nats, total_bytes])
        dist.all_reduce(both)
        total_nats, total_bytes = both[0], both[1]
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
