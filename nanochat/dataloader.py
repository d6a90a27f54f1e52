"""Tokenizing, rank-sharded, exactly resumable pretraining data loader.

Rank r of W reads the global row groups r, r+W, r+2W, ... of the split, prepends BOS to every document,
concatenates the tokens and cuts (B, T) batches from the stream. The state yielded with each batch is
tiny - which row group is being consumed, how far into its tokens, which epoch - so a resume re-reads one
row group, skips the consumed tokens and continues with exactly the next batch.
"""

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import parquets_iter_batched


def tokenizing_distributed_data_loader(B, T, split, tokenizer=None, device="cpu", rank=None, world_size=None,
                                       resume_state=None, tokenizer_threads=4):
    assert split in ("train", "val"), "split must be 'train' or 'val'"
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    bos = tokenizer.get_bos_token_id()
    needed = B * T + 1
    use_pinned = torch.device(device).type == "cuda"

    state = resume_state or {"row_group": rank, "epoch": 0, "pos": 0}
    row_group, epoch, pos = state["row_group"], state["epoch"], state["pos"]
    assert row_group % world_size == rank, "resume state belongs to another rank"

    def row_groups_from(start):
        """(global row-group index, token list) from `start`, this rank's stride, wrapping into new epochs."""
        nonlocal epoch
        index = start
        while True:
            found = False
            for docs in parquets_iter_batched(split, start=index, step=world_size):
                found = True
                tokens = [t for doc in tokenizer.encode(docs, prepend=bos, num_threads=tokenizer_threads) for t in doc]
                yield index, tokens
                index += world_size
            if not found:
                raise RuntimeError(f"the {split} split has no row group for rank {rank} of {world_size}: "
                                   f"too little data for this many ranks")
            epoch += 1
            index = rank

    source = row_groups_from(row_group)
    row_group, tokens = next(source)
    while True:
        batch = []
        while len(batch) < needed:
            if pos == len(tokens):
                row_group, tokens = next(source)
                pos = 0
            take = min(needed - len(batch), len(tokens) - pos)
            batch.extend(tokens[pos:pos + take])
            pos += take
        buf = torch.tensor(batch, dtype=torch.long, pin_memory=use_pinned)
        inputs = buf[:-1].view(B, T).to(device, non_blocking=use_pinned)
        targets = buf[1:].view(B, T).to(device, non_blocking=use_pinned)
        yield inputs, targets, {"row_group": row_group, "epoch": epoch, "pos": pos}
