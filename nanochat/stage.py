"""The training stages of the pipeline, declared once. Checkpoint folders, every --source choice, the report's
section order and scripts/compare.py read this list; each stage's script declares how it trains (its loader,
loss, eval and defaults) and hands the loop to nanochat/train_loop.py. Adding a stage: one line here and its script.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """Args:
        name: checkpoint folder (<base>/checkpoints/<name>/<tag>) and the name the other commands use.
        source: the stage whose checkpoint it starts from by default (None: from scratch).
        section: its report section (nanochat/report.py).
        script: the module that runs it (python -m ...).
    """
    name: str
    source: str | None
    section: str
    script: str


STAGES = {s.name: s for s in (
    Stage("base", None, "Base model training", "scripts.base_train"),
    Stage("mid", "base", "Midtraining", "scripts.mid_train"),
    Stage("sft", "mid", "Chat SFT", "scripts.chat_sft"),
    Stage("rl", "sft", "Chat RL", "scripts.chat_rl"),
)}
STAGE_NAMES = list(STAGES)  # every --source choice


def lineage(name):
    """The stages that lead to `name` through their default sources, first to last: lineage("sft") = base, mid, sft."""
    chain = [name]
    while STAGES[chain[-1]].source is not None:
        chain.append(STAGES[chain[-1]].source)
    return chain[::-1]


def check_stage(name):
    """The stage's declaration, or a ValueError that lists the stages there are."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)} (nanochat/stage.py)")
    return STAGES[name]
