"""The sync library of every training script: diloco/ (DDP and DiLoCo) when it is importable, else nanochat's own
DDP (nanochat/sync.py). Both offer add_sync_args, sync_config_from_args, make_worker_groups and make_sync."""

try:
    import diloco as sync_lib
except ModuleNotFoundError as e:
    if e.name != "diloco":  # diloco is there but broken: say so rather than fall back quietly
        raise
    import nanochat.sync as sync_lib

__all__ = ["sync_lib"]
