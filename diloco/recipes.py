"""Named DiLoCo recipes: flag sets tried against DiLoCo's gap to DDP (bench_diloco --sweep measures them,
scripts.compare --diloco-recipe trains the pipeline's DiLoCo arms with one). Each is a list of sync flags added
after a stage's own (--diloco-h of the scale), so a later flag wins."""

RECIPES = {
    # the paper's DiLoCo: the scale's H, outer SGD lr 0.7, Nesterov 0.9, fp32 exchange
    "paper": [],
    # drift-aware: the exchange applied at the end of training is a plain average, nothing extrapolated into the
    # final weights by the outer momentum
    "final_average": ["--outer-final-average", "1"],
    # drift-aware: small outer steps while the workers' pseudo-gradients still point far apart (first 2 rounds)
    "lr_warmup": ["--outer-lr-warmup", "2"],
    # more, smaller exchanges: H 10 (5x the syncs of H 50 at the tiny budget), each int4 (about 8x smaller)
    "h10_int4": ["--diloco-h", "10", "--outer-compression", "int4"],
    # the same with every exchange a plain average (outer lr 1, no momentum: local SGD): with 40 rounds the
    # Nesterov momentum of the paper builds up to about 10x the outer lr
    "h10_int4_average": ["--diloco-h", "10", "--outer-compression", "int4", "--outer-lr", "1.0", "--outer-momentum", "0"],
    # SparseLoCo (arXiv 2508.15706) with the paper's settings: H 15, each worker's error feedback decayed by 0.95 in
    # place of the outer momentum, the top 64 of each 4096 entries in 2 bits + 12-bit indices (about 1/146 of an fp32
    # copy per sync), outer SGD lr 1 without momentum (diloco/codecs.py)
    "sparseloco": ["--diloco-h", "15", "--outer-compression", "sparseloco", "--outer-sparseloco-density", "0.015625",
                   "--outer-sparseloco-chunk", "4096", "--outer-sparseloco-bits", "2", "--outer-ef-decay", "0.95",
                   "--outer-lr", "1.0"],
}


def recipe_flags(name):
    if name not in RECIPES:
        raise ValueError(f"unknown DiLoCo recipe {name!r}: choose from {', '.join(RECIPES)}")
    return list(RECIPES[name])
