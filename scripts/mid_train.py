"""Midtraining: teach a base model the chat format, tool use and multiple choice, with DDP or DiLoCo.
The training itself lives in scripts/chat_train.py (shared with SFT).

    python -m scripts.mid_train --model-tag d20
    torchrun --nproc_per_node=8 -m scripts.mid_train --sync diloco --diloco-h 100
"""

from nanochat.common import exit_now, usage_errors
from scripts.chat_train import main

if __name__ == "__main__":
    with usage_errors():  # a flag or checkpoint that cannot work: one line, exit 1
        main("mid")
    exit_now()  # skip native teardown (see nanochat.common.exit_now)
