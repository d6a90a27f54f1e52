"""Supervised fine-tuning: whole conversations, loss on the assistant's tokens only, with DDP or DiLoCo.
The training itself lives in scripts/chat_train.py (shared with midtraining).

    python -m scripts.chat_sft --model-tag d20
    torchrun --nproc_per_node=8 -m scripts.chat_sft --sync diloco --diloco-h 100
"""

from scripts.chat_train import cli

if __name__ == "__main__":
    cli("sft")
