"""The sync library of every training script: diloco/ (DDP and DiLoCo) when it is importable, else nanochat's own
DDP (nanochat/sync.py). Both offer add_sync_args, make_worker_groups and make_sync; scripts/flags.py turns the
flags into the config they take."""

try:
    import diloco as sync_lib
except ModuleNotFoundError as e:
    if e.name != "diloco":  # diloco is there but broken: say so rather than fall back quietly
        raise
    import nanochat.sync as sync_lib

__all__ = ["sync_lib", "sync_summary"]


def sync_summary(args, groups):
    """A report's sync columns: the mode and, for DiLoCo, the settings that tell its runs apart."""
    if args.sync != "diloco":
        return {"sync": args.sync}
    return {"sync": "diloco", "diloco_h": args.diloco_h, "workers": groups.num_workers, "outer_lr": args.outer_lr,
            "outer_momentum": args.outer_momentum, "compression": args.outer_compression}
