"""--elastic in the conversation stages: each worker of an elastic run is its own torchrun job (rank 0 of world
1), so only the data slot from --replica-id keeps two workers off the same conversations. SFT takes that slot, as
base_train does; chat_rl, whose prompts are dealt by rank, refuses the flag."""

import pytest

from nanochat.common import UsageError
from nanochat.sync import DDPSync
from scripts import chat_rl, chat_train
from tests.helpers_tiny import TAG, build_tiny, synthetic_conversations


class Recorded(list):
    """Conversations that remember which of them were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read = set()

    def __getitem__(self, i):
        self.read.add(i)
        return super().__getitem__(i)


def sft_worker(monkeypatch, replica_id, elastic=True):
    """chat_sft's main as one elastic worker (torchft's exchange replaced by a plain DDP step: this test is
    about the data); -> the indices of the training conversations it read."""
    train = Recorded(synthetic_conversations(64, seed=3))
    monkeypatch.setattr(chat_train, "training_mixture", lambda stage: (train, [("synthetic", len(train))], []))
    monkeypatch.setattr(chat_train, "validation_task", lambda: synthetic_conversations(4, seed=4))
    monkeypatch.setattr(chat_train.sync_lib, "make_sync", lambda config, model, opts, groups: DDPSync(model, opts, groups))
    flags = ["--sync", "diloco", "--elastic", "torchft", "--replica-id", replica_id, "--max-workers", "2"] if elastic else []
    chat_train.main("sft", ["--source", "sft", "--model-tag", TAG, "--output-tag", f"elastic_{replica_id}",
                            "--num-iterations", "3", "--examples-per-step", "4", "--device-batch-size", "2",
                            "--max-seq-len", "64", "--eval-every", "0", "--eval-batches", "1", "--device-type", "cpu",
                            *flags])
    return train.read


def test_two_elastic_sft_workers_read_disjoint_conversations(base_dir, monkeypatch):
    build_tiny(base_dir)
    site0, site1 = sft_worker(monkeypatch, "site0"), sft_worker(monkeypatch, "site1")
    assert len(site0) == len(site1) == 12  # 3 steps x 4 conversations each
    assert site0.isdisjoint(site1)
    assert site0 == set(range(0, 24, 2)) and site1 == set(range(1, 24, 2))  # slot n of 2 takes n, n + 2, ...


def test_without_elastic_every_single_process_run_reads_the_same_conversations(base_dir, monkeypatch):
    build_tiny(base_dir)  # what two elastic workers would do without their data slot
    assert sft_worker(monkeypatch, "a", elastic=False) == sft_worker(monkeypatch, "b", elastic=False) == set(range(12))


def test_chat_rl_refuses_elastic_with_the_reason():
    with pytest.raises(UsageError, match="chat_rl does not take --elastic.*same prompts"):
        chat_rl.main(["--sync", "diloco", "--elastic", "torchft", "--replica-id", "site0"])
