"""Parsed flags -> the typed configs the library takes: the one place that reads the flags of add_stage_args
(nanochat/train_loop.py), add_sync_args (diloco/sync.py, or nanochat/sync.py without diloco/) and add_codec_args
(diloco/codecs.py). Library code under nanochat/ and diloco/ never sees an argparse Namespace."""

from nanochat.runner import RunConfig
from nanochat.sync import DDPConfig
from scripts.sync_choice import sync_lib

if sync_lib.__name__ == "diloco":
    from diloco import ElasticConfig, SyncConfig
    from diloco.codecs import CodecConfig


def run_config(args):
    """The flags of add_stage_args (and --sample-every where a stage has it) as a RunConfig."""
    return RunConfig(device_type=args.device_type, run=args.run, seed=args.seed, resume=args.resume,
                     stop_after=args.stop_after, eval_every=args.eval_every, sample_every=getattr(args, "sample_every", 0),
                     save_every=args.save_every, compile=args.compile)


def sync_config(args):
    """The --sync flags as the config of the picked sync library: diloco's SyncConfig (--sync ddp included), or
    nanochat's DDPConfig when diloco/ is absent."""
    if sync_lib.__name__ != "diloco":
        return DDPConfig(comm_delay_s=args.comm_delay_ms / 1000, collective_timeout=args.collective_timeout)
    elastic = None
    if args.elastic == "torchft":
        elastic = ElasticConfig(lighthouse=args.lighthouse, replica_id=args.replica_id, max_workers=args.max_workers,
                                min_workers=args.min_workers, max_outer_retries=args.max_outer_retries,
                                peer_timeout=args.peer_timeout, link_mbps=args.link_mbps)
    return SyncConfig(mode=args.sync, h=args.diloco_h, workers=args.diloco_workers, outer_lr=args.outer_lr,
                      outer_momentum=args.outer_momentum, outer_nesterov=bool(args.outer_nesterov),
                      outer_lr_warmup=args.outer_lr_warmup, outer_final_average=bool(args.outer_final_average),
                      outer_device=args.outer_device, fragments=args.diloco_fragments, overlap=args.diloco_overlap,
                      alpha=args.fragment_alpha, codec=codec_config(args), elastic=elastic,
                      comm_delay_s=args.comm_delay_ms / 1000, collective_timeout=args.collective_timeout)


def codec_config(args):
    """The flags of add_codec_args (diloco/codecs.py) as a CodecConfig."""
    return CodecConfig(name=args.outer_compression, topk_fraction=args.outer_topk_fraction,
                       dct_fraction=args.outer_dct_fraction, dct_chunk=args.outer_dct_chunk, dct_bits=args.outer_dct_bits,
                       sparseloco_density=args.outer_sparseloco_density, sparseloco_chunk=args.outer_sparseloco_chunk,
                       sparseloco_bits=args.outer_sparseloco_bits, ef_decay=args.outer_ef_decay)
