"""Midtraining: teach a base model the chat format, tool use and multiple choice, with DDP or DiLoCo.
The training itself lives in scripts/chat_train.py (shared with SFT).

    python -m scripts.mid_train --model-tag d20
    torchrun --nproc_per_node=8 -m scripts.mid_train --sync diloco --diloco-h 100
"""

from scripts.chat_train import cli

if __name__ == "__main__":
    cli("mid")
