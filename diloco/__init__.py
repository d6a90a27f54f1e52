"""DiLoCo as a thin wrapper over nanochat's training loop: see diloco/sync.py (it implements nanochat/sync.py's
protocol). Scripts add the flags (add_sync_args) and turn them into a typed SyncConfig (scripts/flags.py)."""

from diloco.sync import DDPSync, DiLoCoSync, ElasticConfig, SyncConfig, add_sync_args, make_sync, make_worker_groups

__all__ = ["DDPSync", "DiLoCoSync", "ElasticConfig", "SyncConfig", "add_sync_args", "make_sync", "make_worker_groups"]
