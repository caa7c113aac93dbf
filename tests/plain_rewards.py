"""Run in a fresh process: rewards from a saved folder with nothing but plain transformers.

    python tests/plain_rewards.py MODEL_DIR TEXTS.json  ->  prints a JSON list of rewards

This is what an RL trainer does with the folder (tokenizer(texts, padding=True) -> model -> logits).
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, texts_file = sys.argv[1], sys.argv[2]
texts = json.loads(open(texts_file, encoding="utf-8").read())
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir)
model.eval()
rewards = []
with torch.no_grad():
    for start in range(0, len(texts), 8):
        batch = tokenizer(texts[start : start + 8], padding=True, return_tensors="pt")
        rewards.extend(model(**batch).logits[:, 0].tolist())
print(json.dumps(rewards))
