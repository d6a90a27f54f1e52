"""The training mixtures of midtraining and SFT, built from what is reachable.

Online they follow nanochat (SmolTalk, MMLU auxiliary_train, GSM8K train, ARC train, spelling with the
calculator tool). Offline some of those
exist nowhere (see shared DATA.md): the mixture leaves them out and says so, and never substitutes a split
that is reported as a test score. MMLU's dev and validation splits (not the reported test split) stand in
for auxiliary_train offline, so the model still sees the multiple-choice format.
"""

from tasks.arc import ARC
from tasks.chat import ChatData
from tasks.common import NotAvailableOffline, TaskMixture
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

SOURCES = {
    "mid": [
        ("chat (SmolTalk, offline ShareGPT)", lambda: ChatData("train")),
        ("MMLU auxiliary_train", lambda: MMLU("auxiliary_train", "train")),
        ("GSM8K train", lambda: GSM8K("main", "train")),
        ("ARC-Easy train", lambda: ARC("ARC-Easy", "train")),
        ("ARC-Challenge train", lambda: ARC("ARC-Challenge", "train")),
        ("SpellingBee (tool use)", lambda: SpellingBee(size=2000, split="train")),
    ],
    "sft": [
        ("chat (SmolTalk, offline ShareGPT)", lambda: ChatData("train", stop=10_000)),
        ("ARC-Easy train", lambda: ARC("ARC-Easy", "train")),
        ("ARC-Challenge train", lambda: ARC("ARC-Challenge", "train")),
        ("GSM8K train", lambda: GSM8K("main", "train")),
    ],
}
STAND_INS = {
    "MMLU auxiliary_train": [("MMLU dev", lambda: MMLU("all", "dev")), ("MMLU validation", lambda: MMLU("all", "validation"))],
}


def training_mixture(stage):
    """(TaskMixture, used: [(name, examples)], missing: [name]) for stage "mid" or "sft"."""
    tasks, used, missing = [], [], []
    for name, make in SOURCES[stage]:
        try:
            task = make()
            tasks.append(task)
            used.append((name, len(task)))
        except NotAvailableOffline:
            missing.append(name)
            for stand_in, make_stand_in in STAND_INS.get(name, []):
                task = make_stand_in()
                tasks.append(task)
                used.append((f"{stand_in} (stand-in for {name})", len(task)))
    return TaskMixture(tasks), used, missing


def validation_task():
    return ChatData("val")
