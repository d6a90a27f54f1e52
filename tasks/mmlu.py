"""MMLU: 4-choice questions over 57 subjects. "all" for evaluation, "auxiliary_train" (split "train") for
midtraining (the latter exists only on Hugging Face)."""

from tasks.common import MMLU as DATASET, MultipleChoiceTask, load_records, render_mc

LETTERS = ["A", "B", "C", "D"]


class MMLU(MultipleChoiceTask):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        ok = (subset == "all" and split in ("test", "validation", "dev")) or (subset == "auxiliary_train" and split == "train")
        if not ok:
            raise ValueError(f"MMLU wants subset all with split test|validation|dev, or auxiliary_train with split train; got {subset} {split}")
        self.records = load_records(DATASET, subset, "train" if subset == "auxiliary_train" else split)

    def num_examples(self):
        return len(self.records)

    def get_example(self, index):
        row = self.records[index]
        messages = [
            {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
            {"role": "assistant", "content": LETTERS[row["answer"]]},
        ]
        return {"messages": messages, "subject": row["subject"], "letters": list(LETTERS)}
