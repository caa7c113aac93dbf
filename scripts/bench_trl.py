"""One TRL 1.16 `RewardTrainer` run for `scripts/bench.py` (run as a subprocess, one run per process).

    python scripts/bench_trl.py SPEC.json

SPEC.json (written by bench.py):

    {"model": DIR, "gguf_file": null | FILE, "pad_token": null | TOKEN, "pretokenize": false,
     "train": {"path": P, "skip": 0, "limit": N | null, "where": {...}},
     "eval":  {"path": P, "skip": S, "limit": null, "where": {...}},
     "columns": ["chosen", "rejected"(, "prompt", "margin")],
     "max_length": 512, "batch_size": 8, "learning_rate": 1e-4, "gradient_checkpointing": true,
     "seed": 42, "lora": null | {"r", "alpha", "target_modules", "modules_to_save"}, "output_dir": DIR}

Prints exactly one JSON line on stdout (everything else goes to stderr):

    {"tool": "trl", "train": {seconds, pairs, pairs_per_s, real_tokens, computed_tokens, steps, ...},
     "eval": {accuracy, accuracy_per_pair, pairs, ...}, ...}

Measured:
- training pairs/s: `trainer.train()`'s `train_samples_per_second` (timed by Trainer from the start of its
  training loop, after model load and data preparation; evaluation is off during training);
- computed tokens: `input_ids.numel()` of every batch the data collator builds during training (the padded
  chosen+rejected batch that is fed to the model); real tokens: the sum of its attention mask;
- eval: `trainer.evaluate()` run separately after training. `eval_accuracy` is TRL's number (the mean of
  per-batch accuracies); `accuracy_per_pair` counts each pair once (strict >, as rmtrain does), the two only
  differ when the last eval batch is smaller.

Workarounds (the same data reaches both tools):
- `pretokenize`: BERT-like tokenizers have no EOS and TRL 1.16 crashes in its EOS step
  (`str.endswith(None)`). TRL skips its own processing when `chosen_ids`/`rejected_ids` columns exist, so the
  texts are tokenized here as `tokenizer(prompt + text)["input_ids"]` ([CLS] ... [SEP], no EOS) -- what rmtrain
  feeds an encoder. TRL still filters pairs longer than `max_length`.
- `gguf_file`: the model is loaded here (`AutoModelForSequenceClassification.from_pretrained(dir,
  gguf_file=..., num_labels=1)`); transformers flags a dequantized GGUF model as quantized, which Trainer
  refuses to train, so the flags are cleared (the weights are plain fp32).
- `pad_token`: SmolLM2's pad token is its EOS; transformers' last-non-pad pooling would then skip the EOS that
  TRL appends, so a spare token (`<|endoftext|>`) becomes the pad token, as rmtrain does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def read_rows(source: dict, columns: list[str]) -> list[dict]:
    """The rows rmtrain's `{path, where, skip, limit}` selects, restricted to `columns` (same order)."""
    rows = []
    with open(source["path"], encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    where = source.get("where") or {}
    rows = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    rows = rows[source.get("skip") or 0 :]
    if source.get("limit") is not None:
        rows = rows[: source["limit"]]
    return [{c: r[c] for c in columns if c in r} for r in rows]


class CountingCollator:
    """Wraps TRL's collator and counts what it builds, separately for training and evaluation."""

    def __init__(self, inner):
        self.inner = inner
        self.mode = "train"
        self.counts = {m: {"batches": 0, "pairs": 0, "computed_tokens": 0, "real_tokens": 0} for m in ("train", "eval")}

    def __call__(self, examples):
        batch = self.inner(examples)
        c = self.counts[self.mode]
        c["batches"] += 1
        c["pairs"] += batch["input_ids"].shape[0] // 2
        c["computed_tokens"] += batch["input_ids"].numel()
        c["real_tokens"] += int(batch["attention_mask"].sum())
        return batch


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Trainer, tqdm and friends print to stdout: send it all to stderr
    sys.stdout = sys.stderr

    t_start = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class BenchRewardTrainer(RewardTrainer):
        """RewardTrainer unchanged in training; in evaluation it also keeps each pair's outcome."""

        eval_outcomes: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).detach().float(), 2)
            self.eval_outcomes.extend((chosen > rejected).tolist())
            return (loss, outputs) if return_outputs else loss

    seed = spec["seed"]
    tok_kwargs = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {}
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], **tok_kwargs)
    if spec.get("pad_token"):
        pad = spec["pad_token"]
        assert pad in tokenizer.get_vocab() and pad not in (tokenizer.eos_token, tokenizer.bos_token), pad
        tokenizer.pad_token = pad

    if spec.get("gguf_file"):
        set_seed(seed)  # the random score head, as RewardTrainer seeds before loading a model by name
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model"], gguf_file=spec["gguf_file"], num_labels=1, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = spec["model"]  # RewardTrainer loads it (fp32, seeded)

    columns = spec["columns"]
    datasets_ = {}
    for split in ("train", "eval"):
        rows = read_rows(spec[split], columns)
        if spec.get("pretokenize"):
            for row in rows:
                prompt = row.pop("prompt", "")
                row["chosen_ids"] = tokenizer(prompt + row.pop("chosen"))["input_ids"]
                row["rejected_ids"] = tokenizer(prompt + row.pop("rejected"))["input_ids"]
        datasets_[split] = Dataset.from_list(rows)

    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        lora = spec["lora"]
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=0.0,
            target_modules=lora["target_modules"],
            modules_to_save=lora["modules_to_save"],
        )

    gc = spec["gradient_checkpointing"]
    args = RewardConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        num_train_epochs=1,
        max_length=spec["max_length"],
        activation_checkpointing=gc,  # transformers 5 name; `gradient_checkpointing` is its deprecated alias
        gradient_checkpointing=gc,
        bf16=False,
        fp16=False,
        seed=seed,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_dropout=True,
        dataloader_drop_last=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    # RewardTrainer builds DataCollatorForPreference from the tokenizer's pad token when none is given; the same,
    # wrapped to count tokens.
    collator = CountingCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id))
    trainer = BenchRewardTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=datasets_["train"],
        eval_dataset=datasets_["eval"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.eval_outcomes = []
    assert trainer.processing_class.pad_token_id == collator.inner.pad_token_id
    setup_seconds = time.perf_counter() - t_start

    t0 = time.perf_counter()
    out = trainer.train()
    train_wall = time.perf_counter() - t0
    collator.mode = "eval"
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_wall = time.perf_counter() - t0

    tr = collator.counts["train"]
    ev = collator.counts["eval"]
    outcomes = trainer.eval_outcomes
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "train_pairs": len(trainer.train_dataset),
        "eval_pairs": len(trainer.eval_dataset),
        "train": {
            "seconds": out.metrics["train_runtime"],
            "wall_seconds": train_wall,
            "pairs": tr["pairs"],
            "pairs_per_s": out.metrics["train_samples_per_second"],
            "real_tokens": tr["real_tokens"],
            "computed_tokens": tr["computed_tokens"],
            "trl_num_tokens": int(trainer._total_train_tokens),
            "steps": trainer.state.global_step,
            "train_loss": out.metrics.get("train_loss"),
        },
        "eval": {
            "accuracy": metrics.get("eval_accuracy"),
            "accuracy_per_pair": sum(outcomes) / len(outcomes) if outcomes else None,
            "loss": metrics.get("eval_loss"),
            "pairs": ev["pairs"],
            "seconds": eval_wall,
        },
        "setup_seconds": setup_seconds,
    }
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
