"""DiLoCo as a thin wrapper over nanochat's training loop: see diloco/sync.py."""

from diloco.sync import DDPSync, DiLoCoSync, add_sync_args, make_sync, make_worker_groups

__all__ = ["DDPSync", "DiLoCoSync", "add_sync_args", "make_sync", "make_worker_groups"]
