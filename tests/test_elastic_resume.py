"""World-size-independent checkpoints: the data position is global (a run continued with 2 -> 1 -> 3 ranks
reads every token at most once and skips none), DiLoCo's theta_global and outer momentum are saved by
parameter name and carried exactly into any layout of workers and ranks, and base_train resumes across
such changes end to end."""

import os

import torch
import torch.nn as nn

from diloco import make_sync, make_worker_groups
from nanochat.checkpoint import checkpoint_dir, find_last_step, load_checkpoint
from nanochat.dataloader import Cursor, _shuffled_row_batches, _token_batches, merge_loader_states, row_order
from tests.dist_utils import run_distributed
from tests.helpers_pipeline import TINY_MODEL, make_tiny_corpus, torchrun
from tests.test_diloco import GroupSGD, sync_args, toy_batch, toy_model


def item_tokens(i):
    """Item i's tokens, each a unique id that names its item and offset (lengths vary, as row groups do)."""
    return [i * 100 + k for k in range(5 + (i * 7) % 13)]


def read(cursor_state, rank, world, batches):
    """Run one rank's loader for `batches` batches; returns (tokens consumed, the per-rank state after)."""
    loader = _token_batches(Cursor(rank, world, cursor_state), item_tokens, 2, 3, "cpu")
    consumed, state = [], None
    for _ in range(batches):
        x, y, state = next(loader)
        consumed += x.reshape(-1).tolist() + [y.reshape(-1)[-1].item()]
    return consumed, state


def test_data_position_survives_2_1_3_ranks_with_every_token_read_at_most_once():
    seen, position = [], None
    for world, batches in ((2, (3, 5)), (1, (4,)), (3, (2, 3, 1))):  # ranks read at different paces
        states = []
        for rank in range(world):
            consumed, state = read(position, rank, world, batches[rank])
            seen += consumed
            states.append(state)
        position = merge_loader_states(states)
    assert len(seen) == len(set(seen)), "a token was read twice"
    # nothing skipped: what was read plus what the position still holds is every item below its frontier
    remaining = [t for i, pos in position["open"] for t in item_tokens(i)[pos:]]
    everything = [t for i in range(position["next"]) for t in item_tokens(i)]
    assert sorted(seen + remaining) == everything
    # a per-rank state resumes that very rank exactly (same number of ranks): the uninterrupted stream
    whole, _ = read(None, 1, 2, 6)
    first, state = read(None, 1, 2, 2)
    rest, _ = read(state, 1, 2, 4)
    assert first + rest == whole


# --- DiLoCo's outer state by parameter name ---------------------------------------------------------------

def _train_and_save(rank, world_size):
    """2 workers, 2 fragments (a cut inside a weight matrix), 5 inner steps at H = 2: saved mid-round."""
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--diloco-fragments", "2")
    groups = make_worker_groups(args)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
    for step in range(5):
        x, y = toy_batch(rank, step)
        nn.functional.mse_loss(model(x), y).backward()
        sync.step()
    return sync.portable_state_dict()


def _load_and_resave(rank, world_size, state, workers):
    model = toy_model()
    args = sync_args("--sync", "diloco", "--diloco-h", "2", "--diloco-fragments", "2", "--diloco-workers", str(workers))
    groups = make_worker_groups(args)
    sync = make_sync(args, model, [GroupSGD(model.parameters(), 0.1, groups.inner)], groups)
    sync.load_portable_state_dict(state)
    local = {name: p.detach().clone() for name, p in model.named_parameters()}  # the worker's own weights
    return {"local": local, "resaved": sync.portable_state_dict(), "inner_step": sync.inner_step}


def test_theta_global_and_outer_momentum_carry_exactly_from_2_workers_to_1_and_to_3(tmp_path):
    saved = run_distributed(_train_and_save, 2, tmp_path)[0]
    assert saved["inner_step"] == 5 and set(saved["outer_state"]) == {"momentum_buffer"}
    names = [name for name, _ in toy_model().named_parameters()]
    assert set(saved["theta_global"]) == set(names) == set(saved["outer_state"]["momentum_buffer"])
    assert any(m.abs().sum() > 0 for m in saved["outer_state"]["momentum_buffer"].values())
    # one worker of one rank (this process); three ranks as one worker (theta_global sharded by ownership)
    one = _load_and_resave(0, 1, saved, 1)
    (tmp_path / "three").mkdir()
    three = run_distributed(_load_and_resave, 3, tmp_path / "three", saved, 1)
    for results in ([one], three):
        for r in results:
            assert r["inner_step"] == 5
            assert all(torch.equal(r["local"][n], saved["theta_global"][n]) for n in names)
        resaved = results[0]["resaved"]
        assert all(torch.equal(resaved["theta_global"][n], saved["theta_global"][n]) for n in names)
        assert all(torch.equal(resaved["outer_state"]["momentum_buffer"][n], saved["outer_state"]["momentum_buffer"][n])
                   for n in names)


# --- base_train end to end -------------------------------------------------------------------------------

def test_base_train_diloco_resumes_with_2_then_1_then_3_workers(base_dir):
    make_tiny_corpus(base_dir)
    # 128 tokens per micro-step and rank: 768 per step divides over 1, 2 and 3 ranks
    common = [*TINY_MODEL, "--device-batch-size", "2", "--total-batch-size", "768", "--sync", "diloco",
              "--diloco-h", "2", "--num-iterations", "9", "--eval-every", "0", "--model-tag", "elastic"]
    torchrun("scripts.base_train", common + ["--stop-after", "4"], nproc=2)
    torchrun("scripts.base_train", common + ["--resume", "--stop-after", "6"], nproc=1)
    d = checkpoint_dir("base", "elastic")
    at4 = torch.load(os.path.join(d, "step_000004", "shared.pt"))
    at6 = torch.load(os.path.join(d, "step_000006", "shared.pt"))
    torchrun("scripts.base_train", common + ["--resume"], nproc=3)
    assert find_last_step(d) == 9
    _, _, meta, _ = load_checkpoint(d, 9, "cpu")
    at9 = torch.load(os.path.join(d, "step_000009", "shared.pt"))
    assert meta["layout"] == {"world_size": 3, "workers": 3}
    assert [s["sync"]["inner_step"] for s in (at4, at6, at9)] == [4, 6, 9]
    # the global data position only moves forward, by about the tokens trained (768 per step)
    assert at4["extra"]["loader"]["next"] <= at6["extra"]["loader"]["next"] <= at9["extra"]["loader"]["next"]
    # outer bytes keep counting across the changes (the one-worker stretch sends nothing)
    assert 0 < at4["comm"]["outer"]["bytes"] == at6["comm"]["outer"]["bytes"] < at9["comm"]["outer"]["bytes"]


def read_rows(cursor_state, rank, world, batches, T=4, pools=2):
    """Like read(), for the row packing: each row's inputs, as a tuple of token ids."""
    loader = _shuffled_row_batches(Cursor(rank, world, cursor_state), item_tokens, 3, T, "cpu", data_seed=5, pools=pools)
    rows, state = [], None
    for _ in range(batches):
        x, y, state = next(loader)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one, within each row
        rows += [tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    return rows, state


def test_row_packing_reads_every_row_at_most_once_across_2_1_3_ranks_and_resumes_exactly():
    seen, position = [], None
    for world, batches in ((2, (3, 5)), (1, (4,)), (3, (2, 3, 1))):
        states = []
        for rank in range(world):
            rows, state = read_rows(position, rank, world, batches[rank])
            seen += rows
            states.append(state)
        position = merge_loader_states(states)
    assert len(seen) == len(set(seen)), "a row was read twice"
    # nothing skipped: the rows read plus those the position still holds are every row of the items below its
    # frontier, each row cut from its item's tokens (T + 1 long, one token shared with the next row)
    def rows_of(i):
        t = item_tokens(i)
        return [tuple(t[k * 4:k * 4 + 5]) for k in range((len(t) - 1) // 4)]
    remaining = [r for i, pos in position["open"] for r in [rows_of(i)[k] for k in row_order(i, len(rows_of(i)), 5)][pos:]]
    assert sorted(seen + remaining) == sorted(r for i in range(position["next"]) for r in rows_of(i))
    # a batch draws from both open items, not from one item's consecutive rows
    first, _ = read_rows(None, 0, 1, 1)
    assert len({r[0] // 100 for r in first}) > 1
    # a per-rank state resumes that very rank exactly
    whole, _ = read_rows(None, 1, 2, 6)
    first, state = read_rows(None, 1, 2, 2)
    rest, _ = read_rows(state, 1, 2, 4)
    assert first + rest == whole
