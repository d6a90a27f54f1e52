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


def conversation_stream_loader(task, tokenizer, B, T, device="cpu", rank=0, world_size=1):
    """Midtraining batches: rank r renders conversations r, r+W, ... of `task` and packs their tokens into a
    stream, like pretraining (every token is a target; the model learns the chat format itself). Loops
    over the task forever; yields (inputs, targets, epoch)."""
    needed = B * T + 1
    buffer, epoch = [], 0
    while True:
        for index in range(rank, len(task), world_size):
            ids, _ = tokenizer.render_conversation(task[index], max_tokens=T + 1)
            buffer.extend(ids)
            while len(buffer) >= needed:
                buf = torch.tensor(buffer[:needed], dtype=torch.long)
                del buffer[:needed]
                yield buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device), epoch
        epoch += 1


def conversation_padded_loader(task, tokenizer, B, T, device="cpu", rank=0, world_size=1):
    """SFT batches: B whole conversations per batch (rank r takes r, r+W, ...), each truncated to T+1 tokens
    and padded; only assistant-produced tokens (the render mask) are targets, the rest are -1. Loops
    forever; yields (inputs, targets, epoch)."""
    pad = tokenizer.get_bos_token_id()
    rows, epoch = [], 0
    while True:
        for index in range(rank, len(task), world_size):
            rows.append(tokenizer.render_conversation(task[index], max_tokens=T + 1))
            if len(rows) == B:
                width = max(len(ids) for ids, _ in rows)
                inputs = torch.full((B, width - 1), pad, dtype=torch.long)
                targets = torch.full((B, width - 1), -1, dtype=torch.long)
                for i, (ids, mask) in enumerate(rows):
                    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
                    inputs[i, :len(ids) - 1] = ids_t[:-1]
                    targets[i, :len(ids) - 1] = torch.where(mask_t[1:] == 1, ids_t[1:], -1)
                rows = []
                yield inputs.to(device), targets.to(device), epoch
        epoch += 1


def count_conversation_tokens(task, tokenizer, T):
    """Tokens the task renders to (each conversation truncated to T+1), for sizing an epoch."""
    return sum(len(tokenizer.render_conversation(task[i], max_tokens=T + 1)[0]) for i in range(len(task)))
