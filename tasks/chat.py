"""General chat conversations for midtraining and SFT: SmolTalk from Hugging Face when online; offline, the
ShareGPT conversations that nanochat/dataset.py set aside for chat (never pretrained on)."""

from tasks.common import SMOLTALK, Task, load_records


class ChatData(Task):

    eval_type = "generative"

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"ChatData split must be train|val, got {split}")
        self.records = load_records(SMOLTALK, None, {"train": "train", "val": "test"}[split])

    def num_examples(self):
        return len(self.records)

    def get_example(self, index):
        return {"messages": list(self.records[index]["messages"])}

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("ChatData is training data with no right answer: evaluate on ARC/MMLU/GSM8K/HumanEval")
