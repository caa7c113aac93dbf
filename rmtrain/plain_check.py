"""Rewards from a model folder with nothing but transformers, read the way an RL trainer reads them.

    python -m rmtrain.plain_check MODEL_DIR INPUTS.json   ->  prints a JSON list of rewards

INPUTS.json is a list of `{"text": ...}` (tokenized with `tokenizer(texts)`, special tokens on: what
best-of-n code writes) or `{"messages": [...]}` (rendered by the chat template, then tokenized without
extra special tokens: what TRL's GRPOTrainer does). Runs in a fresh process after `rmtrain export`, so
nothing of rmtrain's loading code can hide a difference. Imports nothing from rmtrain.
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def plain_rewards(model_dir: str, inputs: list[dict]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.eval()
    rewards = []
    with torch.no_grad():
        for start in range(0, len(inputs), 8):
            chunk = inputs[start : start + 8]
            if "messages" in chunk[0]:
                texts = [tokenizer.apply_chat_template(x["messages"], tokenize=False) for x in chunk]
                batch = tokenizer(texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
            else:
                batch = tokenizer([x["text"] for x in chunk], padding=True, padding_side="right", return_tensors="pt")
            rewards.extend(model(**batch).logits[:, 0].float().tolist())
    return rewards


if __name__ == "__main__":
    print(json.dumps(plain_rewards(sys.argv[1], json.loads(open(sys.argv[2], encoding="utf-8").read()))))
