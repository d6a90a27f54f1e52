"""Tokenizing, rank-sharded, exactly resumable data loaders whose position does not depend on the number of ranks.

The data is a sequence of items (pretraining: row groups of the split; mid/SFT: conversations of the task),
indexed globally across epochs: item i is item i % N of epoch i // N. Rank r of W reads the items r, r+W,
r+2W, ... (a Cursor). Pretraining and midtraining prepend BOS to every document and concatenate the tokens.
Two packings turn that into (B, T) batches:
- "stream": batches cut from the stream in order. A step of a few thousand tokens then holds only 4-5
  consecutive documents of a long-document corpus: highly correlated rows, which learn less per token.
- "rows" (pretraining's default): each item's tokens are cut into rows of T+1 (consecutive rows share one
  token, so nothing is wasted but the item's last partial row) and read in an order drawn per item. A row
  group of ~1,024 documents is the pool, so the rows of a step come from many documents.
The state yielded with each batch is tiny: the item being consumed and how far into it (tokens, or rows
for "rows"), items handed to this rank but not started, and the next index on its stride.

merge_loader_states() turns every rank's state into one global position (no item consumed twice, none
skipped); a resume with any number of ranks hands the open items out round-robin and strides on from there.
So a run can continue with fewer or more workers and still read every document at most once per epoch.
"""

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info
from nanochat.dataset import open_shard, split_files


class Cursor:
    """Which global item indices rank `rank` of `world_size` reads: first the open items a resume handed it,
    then its stride. state() is the position before the item it is given."""

    def __init__(self, rank, world_size, resume_state=None):
        """resume_state: a global position (merge_loader_states), dealt out over the ranks, or this rank's own
        state from a run with the same number of ranks (continues exactly as that rank would have)."""
        state = resume_state or {"next": 0, "open": []}
        if "next" not in state:
            raise ValueError("this loader state predates world-size-independent checkpoints (it has no global "
                             "position): start the stage again without --resume")
        if "world" in state:
            if state["world"] != world_size:
                raise ValueError(f"a per-rank loader state of {state['world']} ranks cannot resume {world_size}: "
                                 f"pass the merged global position (merge_loader_states)")
            self.queue, self.next = [tuple(item) for item in state["open"]], state["next"]
        else:
            self.queue = [tuple(item) for item in state["open"][rank::world_size]]
            self.next = state["next"] + rank
        self.world = world_size

    def take(self):
        """(index, tokens already consumed) of the next item."""
        if self.queue:
            return self.queue.pop(0)
        index, self.next = self.next, self.next + self.world
        return index, 0

    def state(self, index, pos):
        return {"open": [(index, pos), *self.queue], "next": self.next, "world": self.world}


def fresh_loader_state(rank, world_size):
    """The per-rank state of a loader that has read nothing yet."""
    return {"open": [], "next": rank, "world": world_size}


def merge_loader_states(states):
    """One global position from every rank's state: the next index no rank has touched, and every item below
    it that is not finished (a rank's own unstarted stride items included), in order."""
    world = states[0]["world"]
    nxt = max(s["next"] for s in states)
    open_items = [tuple(item) for s in states for item in s["open"]]
    for s in states:
        open_items += [(i, 0) for i in range(s["next"], nxt, world)]
    return {"next": nxt, "open": sorted(open_items)}


def global_loader_state(state):
    """Collective over the world: every rank's loader state merged (what a checkpoint saves)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return merge_loader_states([state])
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return merge_loader_states(states)


class RowGroups:
    """Random access to the split's row groups by global index (shards in order); keeps one shard open."""

    def __init__(self, split):
        self.files, self.starts, total = split_files(split), [], 0
        for path in self.files:
            with open_shard(path) as pf:
                self.starts.append(total)
                total += pf.num_row_groups
        self.count, self.open_path, self.pf = total, None, None

    def read(self, index):
        shard = max(s for s in range(len(self.files)) if self.starts[s] <= index)
        if self.files[shard] != self.open_path:
            if self.pf is not None:
                self.pf.close()
            self.open_path, self.pf = self.files[shard], open_shard(self.files[shard])
        return self.pf.read_row_group(index - self.starts[shard], columns=["text"], use_threads=False).column("text").to_pylist()


def item_order(count, data_seed=0):
    """Which item each position of an epoch reads: the dataset's own order (data_seed 0), or a permutation drawn
    from data_seed (the same for every epoch and rank, so positions and resume stay as they are)."""
    if not data_seed:
        return lambda i: i % count
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(data_seed)).tolist()
    return lambda i: perm[i % count]


def _token_batches(cursor, tokens_of, B, T, device):
    """(inputs, targets, state) batches cut from the concatenated tokens of the cursor's items."""
    needed = B * T + 1
    use_pinned = torch.device(device).type == "cuda"
    index, pos = cursor.take()
    tokens = tokens_of(index)
    while True:
        batch = []
        while len(batch) < needed:
            if pos >= len(tokens):
                index, pos = cursor.take()
                tokens = tokens_of(index)
                continue
            take = min(needed - len(batch), len(tokens) - pos)
            batch.extend(tokens[pos:pos + take])
            pos += take
        buf = torch.tensor(batch, dtype=torch.long, pin_memory=use_pinned)
        inputs = buf[:-1].view(B, T).to(device, non_blocking=use_pinned)
        targets = buf[1:].view(B, T).to(device, non_blocking=use_pinned)
        yield inputs, targets, cursor.state(index, pos)


PACKINGS = ("rows", "stream")
ROW_POOLS = 4  # row groups a "rows" batch draws from: 60 tiny steps, val bpb 2.3407 with 1, 2.3088 with 4, 2.3112 with 8


def item_rows(tokens, T):
    """The (rows, T+1) tensor of an item's tokens: row k is tokens[kT : kT+T+1]; the last partial row is dropped."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    n = max(0, (len(t) - 1) // T)
    return t[:n * T + 1].unfold(0, T + 1, T) if n else t.new_empty((0, T + 1))


def row_order(index, n, data_seed=0):
    """The order in which the n rows of item position `index` are read: a permutation drawn from (index, data_seed),
    so it is the same on every rank and after any resume, and differs between items and epochs."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * index + data_seed)).tolist()


def _shuffled_row_batches(cursor, tokens_of, B, T, device, data_seed=0, pools=1):
    """(inputs, targets, state) batches of B rows drawn round-robin from `pools` items open at once, each item's
    rows read in row_order; state positions count rows, the open items listed in pool order (a resume with the
    same ranks reopens them in that order)."""
    use_pinned = torch.device(device).type == "cuda"
    open_items = [[*cursor.take(), None, None] for _ in range(pools)]  # [index, rows read, rows, order]
    while True:
        batch = []
        while len(batch) < B:
            item = open_items[len(batch) % pools]
            if item[2] is None:
                item[2] = item_rows(tokens_of(item[0]), T)
                item[3] = row_order(item[0], len(item[2]), data_seed)
            if item[1] >= len(item[3]):
                item[:] = [*cursor.take(), None, None]
                continue
            batch.append(item[2][item[3][item[1]]])
            item[1] += 1
        buf = torch.stack(batch)
        inputs, targets = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if use_pinned:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        inputs = inputs.to(device, non_blocking=use_pinned)
        targets = targets.to(device, non_blocking=use_pinned)
        state = cursor.state(*open_items[0][:2])
        state["open"][1:1] = [tuple(item[:2]) for item in open_items[1:]]
        yield inputs, targets, state


def tokenizing_distributed_data_loader(B, T, split, tokenizer=None, device="cpu", rank=None, world_size=None,
                                       resume_state=None, tokenizer_threads=4, data_seed=0, packing="stream", pools=1):
    """Pretraining batches over the split's row groups.

    Args:
        resume_state: a global position (merge_loader_states), or this rank's own state.
        data_seed: the order of the row groups (item_order), and of the rows within them.
        packing: "rows" (rows of many documents per batch) or "stream" (consecutive tokens); see the module doc.
        pools: with "rows", how many items (row groups) a batch draws its rows from at once.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    bos = tokenizer.get_bos_token_id()
    row_groups = RowGroups(split)
    order = item_order(row_groups.count, data_seed)

    def tokens_of(index):
        docs = row_groups.read(order(index))
        return [t for doc in tokenizer.encode(docs, prepend=bos, num_threads=tokenizer_threads) for t in doc]

    cursor = Cursor(rank, world_size, resume_state)
    if packing == "rows":
        return _shuffled_row_batches(cursor, tokens_of, B, T, device, data_seed, pools)
    return _token_batches(cursor, tokens_of, B, T, device)


def conversation_stream_loader(task, tokenizer, B, T, device="cpu", rank=0, world_size=1, resume_state=None,
                               data_seed=0):
    """Midtraining batches: rank r renders conversations r, r+W, ... of `task` (global indices across epochs) and
    packs their tokens into a stream, like pretraining (every token is a target; the model learns the chat
    format itself). Loops over the task forever; yields (inputs, targets, state), state with "epoch" added."""
    order = item_order(len(task), data_seed)

    def tokens_of(index):
        return tokenizer.render_conversation(task[order(index)], max_tokens=T + 1)[0]

    for inputs, targets, state in _token_batches(Cursor(rank, world_size, resume_state), tokens_of, B, T, device):
        yield inputs, targets, dict(state, epoch=state["open"][0][0] // len(task))


def conversation_padded_loader(task, tokenizer, B, T, device="cpu", rank=0, world_size=1, resume_state=None,
                               data_seed=0):
    """SFT batches: B whole conversations per batch (rank r takes r, r+W, ... by global index), each truncated
    to T+1 tokens and padded; only assistant-produced tokens (the render mask) are targets, the rest are -1.
    Loops forever; yields (inputs, targets, state): the position after the batch, with "epoch" added."""
    pad = tokenizer.get_bos_token_id()
    cursor = Cursor(rank, world_size, resume_state)
    order = item_order(len(task), data_seed)
    while True:
        rows = []
        while len(rows) < B:
            index, done = cursor.take()
            if done:  # a whole conversation is one unit: any recorded progress means it was trained on
                continue
            rows.append(tokenizer.render_conversation(task[order(index)], max_tokens=T + 1))
        width = max(len(ids) for ids, _ in rows)
        inputs = torch.full((B, width - 1), pad, dtype=torch.long)
        targets = torch.full((B, width - 1), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
            inputs[i, :len(ids) - 1] = ids_t[:-1]
            targets[i, :len(ids) - 1] = torch.where(mask_t[1:] == 1, ids_t[1:], -1)
        yield inputs.to(device), targets.to(device), dict(cursor.state(index, 1), epoch=index // len(task))


def count_conversation_tokens(task, tokenizer, T):
    """Tokens the task renders to (each conversation truncated to T+1), for sizing an epoch."""
    return sum(len(tokenizer.render_conversation(task[i], max_tokens=T + 1)[0]) for i in range(len(task)))
