"""Bad input gets one clear line, never a traceback or a lost run: every case of issue 6 through the CLI.

CASES is the one table: test_user_error runs each case and checks exit status 2, the `error:` line(s)
naming the file / YAML key / row with what was expected and how to fix it, no traceback, and what is on
disk afterwards. test_errors_doc_is_current renders the messages the cases printed into docs/errors.md
and fails when that file differs (RMTRAIN_UPDATE_ERRORS_DOC=1 rewrites it), so the doc cannot drift.

How a case runs (the `runner` column):
- "process": `python -m rmtrain` in a fresh process. Recipe errors are reported before torch is imported,
  so these cost well under a second each.
- "in-process": the same Typer app (rmtrain.cli.app) through typer's CliRunner, in this process. Every
  case past the recipe check imports torch/transformers, about 7 s of CPU per fresh process, and some need
  a monkeypatch (a failing allocation, a full disk, a blocked import). An exception escaping the CLI is
  turned into the traceback a fresh process would print, so "no traceback" is checked the same way.
  (tests/test_cli.py runs a data error in a fresh process with and without --debug.)
"""

from __future__ import annotations

import errno
import json
import re
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import ROOT, rmtrain_cli

DOC = ROOT / "docs" / "errors.md"
GOOD_ROWS = [
    {"prompt": "Q: What colour is the sky? A:", "chosen": " Blue.", "rejected": " Green, obviously."},
    {"prompt": "Q: What is 2 + 2? A:", "chosen": " 4.", "rejected": " 5."},
    {"prompt": "Q: Name a fruit. A:", "chosen": " An apple.", "rejected": " A chair."},
    {"prompt": "Q: Say hello. A:", "chosen": " Hello!", "rejected": " Go away."},
]
USER = {"role": "user", "content": "Name a colour."}


def answer(text: str) -> list[dict]:
    return [USER, {"role": "assistant", "content": text}]


# --------------------------------------------------------------------------------------------------
# What a case gets to build its input.


@dataclass
class Ctx:
    tmp: Path
    models: dict[str, str]
    """tiny-qwen3, tiny-qwen3-no-template, smollm2 (folder), smollm2-gguf (file name), minilm."""
    before: dict | None = None
    """snapshot() of the output folder before the run, for cases that must leave it untouched."""

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    def data(self, rows: list | None = None, name: str = "pairs.jsonl", text: str | bytes | None = None) -> Path:
        path = self.tmp / name
        if text is None:
            text = "".join(json.dumps(row) + "\n" for row in (GOOD_ROWS if rows is None else rows))
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def fit(self, *args: str, rows: list | None = None, text: str | bytes | None = None, **sections: dict | None) -> list[str]:
        """`fit recipe.yaml`: a 1-step tiny Qwen3 run on pairs.jsonl (GOOD_ROWS, or `rows`, or `text`), with
        `sections` merged over the recipe."""
        tree: dict = {
            "model": {"name_or_path": self.models["tiny-qwen3"]},
            "data": {"train": {"path": str(self.tmp / "pairs.jsonl")}, "max_length": 64},
            "train": {
                "output_dir": str(self.out),
                "per_device_batch_size": 2,
                "max_steps": 1,
                "logging_steps": 1,
                "gradient_checkpointing": False,
            },
        }
        for section, values in sections.items():
            if values is None or section not in tree:
                tree[section] = values
            else:
                tree[section].update(values)
        if rows is not None or text is not None or not (self.tmp / "pairs.jsonl").exists():
            self.data(rows, text=text)
        recipe = self.tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
        return ["fit", str(recipe), *args]

    def recipe_text(self, text: str) -> list[str]:
        recipe = self.tmp / "recipe.yaml"
        recipe.write_text(text)
        return ["fit", str(recipe)]


@dataclass
class Case:
    id: str
    section: str
    input: str
    """The bad input, as docs/errors.md shows it."""
    setup: Callable[[Ctx], list[str]]
    """Writes the files, returns the CLI arguments."""
    expect: list[str]
    """One fragment per `error:` line (status 2), or fragments of the stderr of a run that handles it (status 0)."""
    runner: str = "in-process"
    status: int = 2
    why_lines: str = ""
    """Why a case prints more than one `error:` line."""
    patch: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None
    """What the machine does wrong in this case (in-process only)."""
    check: Callable[[Ctx], None] | None = None
    """The state on disk afterwards. Without it, a failing case must not have created the run folder."""
    max_seconds: float | None = None


MINIMAL = """\
model: {name_or_path: some/model}
data: {train: {path: pairs.jsonl}}
train: {output_dir: out}
"""

TEN_MB = ("The quick brown fox jumps over the lazy dog. " * 230_000)[:10_000_000]


# --------------------------------------------------------------------------------------------------
# Cases that need more than a file.


def block_gguf_import(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is how Python marks a module that must not import: `import gguf` raises
    # ModuleNotFoundError and importlib.util.find_spec("gguf") answers None, as without the package.
    monkeypatch.setitem(sys.modules, "gguf", None)


def no_bf16_device(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: this machine's CPU supports bf16 autocast, so accelerate's answer is made "no".
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_bf16_available", lambda *a, **k: False)


def allocation_fails(in_training_only: bool):
    """A real allocator failure in the model's forward (4 EiB is more than any machine has, whatever its overcommit
    setting): in every forward, or only in those with gradients (training's, not the layout's probe)."""

    def patch(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch
        from transformers import Qwen3ForSequenceClassification

        real_forward = Qwen3ForSequenceClassification.forward

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled() or not in_training_only:
                torch.empty(1 << 62, dtype=torch.uint8)
            return real_forward(self, *args, **kwargs)

        monkeypatch.setattr(Qwen3ForSequenceClassification, "forward", forward)

    return patch


def disk_fills_during_second_checkpoint(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".checkpoint-2.tmp" in str(f):
            # What a full disk does: part of the file is written, then the write fails with ENOSPC.
            Path(f).write_bytes(b"\0" * 1024)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def disk_fills_during_final_save(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtrain.runs

    def save_model_folder(model, state_dict, tokenizer, fmt, max_length, directory, **extra):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1024)  # part written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(rmtrain.runs, "save_model_folder", save_model_folder)


def final_save_left_nothing_half_written(ctx: Ctx) -> None:
    from rmtrain.runs import latest_checkpoint

    assert not (ctx.out / ".partial.tmp").exists() and not (ctx.out / "model.safetensors").exists()
    assert not (ctx.out / "run_info.json").exists()  # the run is not marked complete
    assert latest_checkpoint(ctx.out) == ctx.out / "checkpoints" / "checkpoint-1"


def previous_checkpoint_intact(ctx: Ctx) -> None:
    from rmtrain.runs import STATE_FILE, latest_checkpoint

    root = ctx.out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1"]  # the partial .checkpoint-2.tmp is gone
    assert latest_checkpoint(ctx.out) == root / "checkpoint-1"  # what --resume continues from
    state = json.loads((root / "checkpoint-1" / STATE_FILE).read_text())
    assert state["step"] == 1
    assert (root / "checkpoint-1" / "model.safetensors").stat().st_size > 0
    assert (root / "checkpoint-1" / "optimizer.bin").stat().st_size > 0


def completed(ctx: Ctx) -> None:
    assert json.loads((ctx.out / "run_info.json").read_text())["complete"]


def not_completed(ctx: Ctx) -> None:
    assert ctx.out.is_dir() and not (ctx.out / "run_info.json").exists() and not (ctx.out / "model.safetensors").exists()


def nothing_created_in_sys(ctx: Ctx) -> None:
    assert not Path("/sys/rmtrain-run").exists()


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder` with its mtime and content."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else "dir")
        for p in sorted(folder.rglob("*"))
    }


def existing_run(ctx: Ctx) -> list[str]:
    (ctx.out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (ctx.out / "checkpoints" / "checkpoint-2" / "training_state.json").write_text('{"step": 2}\n')
    (ctx.out / "recipe.yaml").write_text("from: the old run\n")
    (ctx.out / "metrics.jsonl").write_text('{"step": 1}\n')
    (ctx.out / "model.safetensors").write_bytes(b"weights of the old run")
    ctx.before = snapshot(ctx.out)
    return ctx.fit()


def resume_with_other_data(ctx: Ctx) -> list[str]:
    first = rmtrain_cli(*ctx.fit(train={"max_steps": 2, "save_steps": 1}, rows=GOOD_ROWS[:2]))
    assert first.returncode == 0, first.stderr[-2000:]
    ctx.before = snapshot(ctx.out)
    return [*ctx.fit(train={"max_steps": 3, "save_steps": 1}, rows=GOOD_ROWS[2:]), "--resume"]


def foreign_folder(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("my notes")
    (ctx.out / "config.json").write_text('{"mine": true}\n')
    ctx.before = snapshot(ctx.out)
    return ctx.fit()


def unfinished_run(ctx: Ctx) -> list[str]:
    """A run folder as a killed run leaves it: recipe, metrics, a checkpoint, no final model."""
    checkpoint = ctx.out / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text('{"step": 2}\n')
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (ctx.out / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    ctx.before = snapshot(ctx.out)
    return ["export", str(ctx.out), str(ctx.tmp / "exported")]


def notes_folder(ctx: Ctx) -> Path:
    folder = ctx.tmp / "notes"
    folder.mkdir(exist_ok=True)
    (folder / "readme.txt").write_text("not a model")
    return folder


def adapter_without_its_base(ctx: Ctx) -> list[str]:
    """An adapter folder (with its tokenizer) whose adapter_config.json names a base folder that is gone."""
    import shutil

    folder = ctx.tmp / "adapter"
    folder.mkdir()
    for name in Path(ctx.models["tiny-qwen3"]).iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            shutil.copy(name, folder / name.name)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ctx.tmp / "moved-base"), "peft_type": "LORA"}))
    return ["eval", str(folder), "--data", str(ctx.data())]


def second_model_adapter_without_its_base(ctx: Ctx) -> list[str]:
    """`eval GOOD ADAPTER`: the adapter (weights file present) names a base folder that is gone; found before the good
    model is scored."""
    args = adapter_without_its_base(ctx)
    (Path(args[1]) / "adapter_model.safetensors").write_bytes(b"adapter weights")
    return ["eval", ctx.models["tiny-qwen3"], *args[1:]]


def runs_of_two_bases(ctx: Ctx) -> list[str]:
    """Two finished 1-step runs, one from the tiny Qwen3, one from its copy without a chat template file."""
    for name, model in (("run-a", "tiny-qwen3"), ("run-b", "tiny-qwen3-no-template")):
        done = rmtrain_cli(*ctx.fit(model={"name_or_path": ctx.models[model]}, train={"output_dir": str(ctx.tmp / name)}))
        assert done.returncode == 0, done.stderr[-2000:]
    return ["average", str(ctx.tmp / "run-a"), str(ctx.tmp / "run-b"), "--out", str(ctx.tmp / "averaged")]


def an_ensemble_folder(ctx: Ctx) -> Path:
    """A folder `rmtrain ensemble` made (its manifest is what marks it)."""
    folder = ctx.tmp / "ensemble"
    folder.mkdir()
    (folder / "rmtrain_ensemble.json").write_text('{"members": [], "base": null}\n')
    return folder


def nothing_averaged(ctx: Ctx) -> None:
    assert not any(p.name.startswith((".averaged", "averaged", ".joined", "joined")) for p in ctx.tmp.iterdir())


def strict_template(ctx: Ctx) -> Path:
    """A chat template that refuses two turns of one role in a row, as Mistral's and Llama 2's do."""
    path = ctx.tmp / "strict.jinja"
    path.write_text("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    return path


def nothing_exported_anywhere(ctx: Ctx) -> None:
    assert not (ctx.tmp / "exported").exists()


def export_into_a_full_folder(ctx: Ctx) -> list[str]:
    out = ctx.tmp / "exported"
    out.mkdir()
    (out / "config.json").write_text("{}\n")  # an earlier export, say
    ctx.before = {"config.json": b"{}\n"}
    return ["export", ctx.models["tiny-qwen3"], str(out)]


def exported_folder_kept(ctx: Ctx) -> None:
    out = ctx.tmp / "exported"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ctx.before


def nothing_exported(ctx: Ctx) -> None:
    untouched(ctx)
    assert not any(p.name.startswith("exported") for p in ctx.tmp.iterdir())


RB2_ROWS = [
    {"id": "0", "prompt": "Q: Name a fruit. A:", "chosen": [" An apple."], "rejected": [" A chair.", " Blue.", " Soon."], "subset": "Focus"},
    {"id": "tied:3", "prompt": "Q: Name a colour. A:", "chosen": [" Red.", " Blue."], "rejected": [" A dog."], "subset": "Ties"},
]
LIST_ROWS = [{"prompt": "Q: Name a fruit. A:", "completions": [" An apple.", " A chair.", " Fruit."], "scores": [3, 1, 2]}]


def block_fastapi_import(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as without the package (see block_gguf_import)


def block_wandb_import(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)


def port_taken(ctx: Ctx) -> list[str]:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    ctx.before = {"socket": holder}  # kept open while the case runs
    return ["serve", ctx.models["tiny-qwen3"], "--port", str(holder.getsockname()[1])]


def truncated_weights(ctx: Ctx) -> list[str]:
    import shutil

    folder = ctx.tmp / "truncated"
    shutil.copytree(ctx.models["tiny-qwen3"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    from tests.launch import free_port

    return ["serve", str(folder), "--port", str(free_port())]


def existing_pairs_file(ctx: Ctx) -> list[str]:
    lists = ctx.data(LIST_ROWS, name="lists.jsonl")
    out = ctx.data(GOOD_ROWS, name="pairs.jsonl")
    ctx.before = {"pairs.jsonl": out.read_bytes()}
    return ["binarize", str(lists), str(out)]


def pairs_file_kept(ctx: Ctx) -> None:
    assert (ctx.tmp / "pairs.jsonl").read_bytes() == ctx.before["pairs.jsonl"]


def untouched(ctx: Ctx) -> None:
    assert ctx.before and snapshot(ctx.out) == ctx.before


def empty_template_folder(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "not-a-tokenizer"
    folder.mkdir()
    (folder / "readme.txt").write_text("just notes")
    return ctx.fit(model={"chat_template_path": str(folder)})


# --------------------------------------------------------------------------------------------------
# The table.

CASES = [
    # Recipe ---------------------------------------------------------------------------------------
    Case("recipe-file-missing", "Recipe", "`rmtrain fit` on a recipe path that does not exist",
         lambda c: ["fit", str(c.tmp / "nowhere.yaml")], ["<tmp>/nowhere.yaml: no such file"], runner="process"),
    Case("yaml-syntax-error", "Recipe", "a YAML syntax error (a mis-indented key)",
         lambda c: c.recipe_text("model:\n  name_or_path: x\n train: [\n"),
         ["<tmp>/recipe.yaml: YAML syntax error at line 3, column 2: expected <block end>, but found '<block mapping start>'; "
          "check the indentation, colons and brackets there"], runner="process"),
    Case("unknown-key", "Recipe", "`train.lerning_rate: 3e-5` (misspelt key)",
         lambda c: c.recipe_text(MINIMAL.replace("output_dir: out", "output_dir: out, lerning_rate: 3e-5")),
         ["<tmp>/recipe.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)"], runner="process"),
    Case("wrong-type", "Recipe", "`train.num_epochs: two`",
         lambda c: c.recipe_text(MINIMAL.replace("output_dir: out", "output_dir: out, num_epochs: two")),
         ["<tmp>/recipe.yaml: train.num_epochs: expected float, got str 'two'"], runner="process"),
    Case("impossible-values", "Recipe", "negative `learning_rate`, `per_device_batch_size: 0`, `lora.r: 0`, `max_length: 4`",
         lambda c: c.recipe_text(
             "model: {name_or_path: some/model}\ndata: {train: {path: pairs.jsonl}, max_length: 4}\nlora: {r: 0}\n"
             "train: {output_dir: out, learning_rate: -1e-4, per_device_batch_size: 0}\n"),
         ["<tmp>/recipe.yaml: data.max_length: must be at least 8, got 4",
          "<tmp>/recipe.yaml: lora.r: must be >= 1, got 0",
          "<tmp>/recipe.yaml: train.learning_rate: must be > 0, got -0.0001",
          "<tmp>/recipe.yaml: train.per_device_batch_size: must be >= 1, got 0"],
         runner="process", why_lines="the recipe check lists every problem at once, one line each"),
    Case("missing-required-key", "Recipe", "no `model.name_or_path`",
         lambda c: c.recipe_text(MINIMAL.replace("model: {name_or_path: some/model}", "model: {trust_remote_code: false}")),
         ["<tmp>/recipe.yaml: model.name_or_path: required (a Hub id or a local model folder)"], runner="process"),
    # Model ----------------------------------------------------------------------------------------
    Case("model-folder-missing", "Model", "`model.name_or_path` a local folder that does not exist",
         lambda c: c.fit(model={"name_or_path": str(c.tmp / "no-such-model")}),
         ["model.name_or_path: <tmp>/no-such-model: no such folder; give a local model folder or a Hub id"]),
    Case("model-hub-unreachable", "Model", "`model.name_or_path: someone/no-such-model`, offline (`HF_HUB_OFFLINE=1`)",
         lambda c: c.fit(model={"name_or_path": "someone/no-such-model"}),
         ["model.name_or_path: 'someone/no-such-model' is not a local folder and cannot be fetched from the Hub "
          "(offline: HF_HUB_OFFLINE is set and it is not in the local cache); give a local model folder"]),
    Case("gguf-without-package", "Model", "`model.gguf_file` while the `gguf` package cannot be imported",
         lambda c: c.fit(model={"name_or_path": c.models["smollm2"], "gguf_file": c.models["smollm2-gguf"]}),
         ["model.gguf_file: reading SmolLM2-135M-Instruct.Q4_1.gguf needs the 'gguf' package, which is not installed; "
          "pip install gguf"], patch=block_gguf_import),
    Case("gguf-file-missing", "Model", "`model.gguf_file` naming no file of the model folder",
         lambda c: c.fit(model={"gguf_file": "model.Q4.gguf"}),
         ["model.gguf_file: model.Q4.gguf is not in <tiny-qwen3> (.gguf files there: none)"]),
    Case("lora-target-modules", "Model", "`lora.target_modules: [q_prj]` (no such module)",
         lambda c: c.fit(lora={"target_modules": ["q_prj"]}),
         ["lora.target_modules: q_prj names no module of Qwen3ForSequenceClassification (some module names: "]),
    Case("lora-modules-to-save", "Model", "`lora.modules_to_save: [head]` (no such module)",
         lambda c: c.fit(lora={"modules_to_save": ["head"]}),
         ["lora.modules_to_save: head names no module of Qwen3ForSequenceClassification"]),
    Case("chat-template-not-a-template", "Model", "`model.chat_template_path` a text file that never reads `messages`",
         lambda c: c.fit(model={"chat_template_path": str(c.data(name="notes.txt", text="Hello {{ name }}\n"))}),
         ["model.chat_template_path: <tmp>/notes.txt is not a chat template (it never reads 'messages'); "
          "give a Jinja chat template file or a tokenizer folder"]),
    Case("chat-template-syntax-error", "Model", "`model.chat_template_path` a Jinja file with an unclosed `{% for %}`",
         lambda c: c.fit(model={"chat_template_path": str(c.data(
             name="template.jinja", text="{% for m in messages %}\n{{ m.content }}\n"))}),
         ["model.chat_template_path: <tmp>/template.jinja: line 2: not a valid Jinja template (Unexpected end of template."]),
    Case("chat-template-folder-not-tokenizer", "Model", "`model.chat_template_path` a folder without a tokenizer",
         empty_template_folder,
         ["model.chat_template_path: <tmp>/not-a-tokenizer is a folder but holds no tokenizer transformers can load"]),
    Case("lora-init-from-not-an-adapter", "Model", "`lora.init_from` a model folder that is not a PEFT adapter",
         lambda c: c.fit(lora={"init_from": c.models["tiny-qwen3"]}),
         ["lora.init_from: <tiny-qwen3>: not a PEFT adapter folder (no adapter_config.json); give the folder of a LoRA "
          "run (or of its adapter), or remove lora.init_from to start a new adapter"]),
    Case("tracker-not-installed", "Model", "`train.report_to: [wandb]` without the `wandb` package (blocked from importing)",
         lambda c: c.fit(train={"report_to": ["wandb"]}),
         ["train.report_to: wandb needs wandb, which is not installed: pip install 'rmtrain[wandb]'"], patch=block_wandb_import),
    Case("max-length-over-positions", "Model", "`data.max_length: 5000` for a model with 4096 positions",
         lambda c: c.fit(data={"max_length": 5000}),
         ["data.max_length: 5000 is longer than the 4096 positions <tiny-qwen3> has (max_position_embeddings); "
          "set data.max_length: 4096 or lower"]),
    Case("bf16-unsupported", "Model", "`train.bf16: true` where the device has no bf16 (simulated: this CPU has it)",
         lambda c: c.fit(train={"bf16": True}),
         ["train.bf16: true, but this device does not support bf16; set train.bf16: false (fp32), "
          "or null to use bf16 only where it is supported"], patch=no_bf16_device),
    # Data -----------------------------------------------------------------------------------------
    Case("data-file-missing", "Data", "`data.train.path` a file that does not exist",
         lambda c: c.fit(data={"train": {"path": str(c.tmp / "missing.jsonl")}}),
         ["<tmp>/missing.jsonl: no such file or folder"]),
    Case("data-unsupported-extension", "Data", "`data.train.path: pairs.txt`",
         lambda c: c.fit(data={"train": {"path": str(c.data(name="pairs.txt"))}}),
         ["<tmp>/pairs.txt: unsupported file type '.txt', expected .jsonl, .json, .parquet or .csv"]),
    Case("data-invalid-json-line", "Data", "a JSON lines file whose line 2 is cut short",
         lambda c: c.fit(text=json.dumps(GOOD_ROWS[0]) + '\n{"prompt": "Hi", "chosen": " hello",\n'),
         ["<tmp>/pairs.jsonl: line 2: invalid JSON: Expecting property name enclosed in double quotes (column 37); "
          "JSON lines need one complete JSON object per line"]),
    Case("data-missing-rejected", "Data", "a row without `rejected`",
         lambda c: c.fit(rows=[GOOD_ROWS[0], {"prompt": "Hi", "chosen": "Hello"}]),
         ["<tmp>/pairs.jsonl: row 2: missing 'rejected' (columns present: chosen, prompt; map yours with data.*.columns)"]),
    Case("data-mixed-shapes", "Data", "row 1 holds strings, row 2 message lists",
         lambda c: c.fit(rows=[{"chosen": "Blue.", "rejected": "No."}, {"chosen": answer("Blue."), "rejected": answer("No.")}]),
         ["<tmp>/pairs.jsonl: row 2: is conversational (message lists) but row 1 is standard (strings); use one shape per file"]),
    Case("data-message-without-role", "Data", "a message without `role`",
         lambda c: c.fit(rows=[{"chosen": [{"content": "Blue."}], "rejected": answer("No.")}]),
         ["<tmp>/pairs.jsonl: row 1: chosen: message 0 must be an object with 'role' and 'content', got keys content"]),
    Case("data-unknown-role", "Data", "a message with `role: robot`",
         lambda c: c.fit(rows=[{"chosen": [{"role": "robot", "content": "Blue."}], "rejected": answer("No.")}]),
         ["<tmp>/pairs.jsonl: row 1: chosen: message 0 has unknown role 'robot' (expected one of assistant, developer, system, tool, user)"]),
    Case("data-empty-string", "Data", "`chosen: \"\"`",
         lambda c: c.fit(rows=[GOOD_ROWS[0], {"prompt": "Hi", "chosen": "", "rejected": "Go away."}]),
         ["<tmp>/pairs.jsonl: row 2: 'chosen' is empty; fill it in or remove it"]),
    Case("data-identical-pairs-counted", "Data", "one pair with chosen == rejected among good ones (dropped and counted)",
         lambda c: c.fit(rows=GOOD_ROWS + [{"prompt": "Hi", "chosen": " Same.", "rejected": " Same."}]),
         ["5 pairs read, 4 kept, 0 dropped (longer than 64 tokens), 1 dropped (chosen == rejected)"], status=0,
         check=completed),
    Case("data-all-identical", "Data", "every pair has chosen == rejected",
         lambda c: c.fit(rows=[{"prompt": "Hi", "chosen": " Same.", "rejected": " Same."}] * 2),
         ["train (<tmp>/pairs.jsonl): every pair has chosen identical to rejected (2 read, all dropped); "
          "such pairs teach nothing: check the chosen/rejected columns"]),
    Case("data-not-utf8", "Data", "a Latin-1 byte (0xe9) on line 2",
         lambda c: c.fit(text=(json.dumps(GOOD_ROWS[0]) + "\n").encode() + b'{"chosen": "caf\xe9", "rejected": "tea"}\n'),
         ["<tmp>/pairs.jsonl: line 2: not UTF-8 text (byte 113); re-encode the file as UTF-8"]),
    Case("data-10mb-row", "Data", "one 10 MB row among good ones (dropped and counted, in seconds)",
         lambda c: c.fit(rows=GOOD_ROWS + [{"prompt": "Q:", "chosen": TEN_MB, "rejected": " No."}]),
         ["5 pairs read, 4 kept, 1 dropped (longer than 64 tokens)"], status=0, check=completed, max_seconds=120),
    Case("data-10mb-row-truncate", "Data", "the same with `data.truncation: truncate` (the row is cut to its last tokens and kept)",
         lambda c: c.fit(rows=GOOD_ROWS + [{"prompt": "Q:", "chosen": TEN_MB, "rejected": " No."}], data={"truncation": "truncate"}),
         ["5 pairs read, 5 kept, 1 truncated to 64 tokens"], status=0, check=completed, max_seconds=120),
    Case("data-chat-without-template", "Data", "conversational rows, a tokenizer without a chat template, no `chat_template_path`",
         lambda c: c.fit(rows=[{"chosen": answer("Blue."), "rejected": answer("No.")}],
             model={"name_or_path": c.models["tiny-qwen3-no-template"]}),
         ["<tmp>/pairs.jsonl: row 1: conversational rows need a chat template, and the tokenizer has none; "
          "set model.chat_template_path to a Jinja file or a tokenizer folder"]),
    Case("data-columns-clash", "Data", "`columns: {question: prompt}` on a file that has a `prompt` column too",
         lambda c: c.fit(rows=[{"question": "Q:", "prompt": "P:", "chosen": " a", "rejected": " b"}],
                         data={"train": {"path": str(c.tmp / "pairs.jsonl"), "columns": {"question": "prompt"}}}),
         ["<tmp>/pairs.jsonl: columns: question -> prompt, but the data has a 'prompt' column too; map that one elsewhere "
          "or drop it (prompt: null)"]),
    Case("data-chat-template-refuses", "Data", "conversational rows whose roles the chat template refuses (two user turns in a row)",
         lambda c: c.fit(rows=[{"prompt": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Well?"}],
                                "chosen": answer("Blue.")[1:], "rejected": answer("No.")[1:]}],
                         model={"chat_template_path": str(strict_template(c))}),
         ["<tmp>/pairs.jsonl: row 1: the chat template refused these messages: roles must alternate user/assistant"]),
    Case("data-all-too-long", "Data", "every pair longer than `data.max_length: 8` (truncation: filter)",
         lambda c: c.fit(data={"max_length": 8}),
         ["train (<tmp>/pairs.jsonl): every pair is longer than data.max_length=8 (the longest sequence has 16 tokens); "
          "set data.truncation: truncate, or raise data.max_length"]),
    Case("data-margin-not-numeric", "Data", "`margin: \"big\"` in row 2",
         lambda c: c.fit(rows=[{**GOOD_ROWS[0], "margin": 1.0}, {**GOOD_ROWS[1], "margin": "big"}]),
         ["<tmp>/pairs.jsonl: row 2: 'margin' must be a finite number, got 'big'; fix the value, "
          "or train without margins with data.*.columns: {margin: null}"]),
    Case("data-list-without-scores", "Data", "a ranked-list row without `scores` or `ranks`",
         lambda c: c.fit(rows=[{"prompt": "Q:", "completions": [" a", " b"]}]),
         ["<tmp>/pairs.jsonl: row 1: a list row needs one of 'scores' or 'ranks', it has no 'scores' (higher is better) or "
          "'ranks' (1 is best) (map yours with data.*.columns)"]),
    Case("data-list-scores-length", "Data", "a ranked list with 3 completions and 2 scores",
         lambda c: c.fit(rows=[{"prompt": "Q:", "completions": [" a", " b", " c"], "scores": [1, 2]}]),
         ["<tmp>/pairs.jsonl: row 1: 'scores' must hold one value per completion (3), got 2 values"]),
    Case("data-list-bad-rank", "Data", "`ranks: [1, 0]` (1 is best; 0 is no rank)",
         lambda c: c.fit(rows=[{"prompt": "Q:", "completions": [" a", " b"], "ranks": [1, 0]}]),
         ["<tmp>/pairs.jsonl: row 1: ranks[1] must be a whole number >= 1 (1 is best), got 0"]),
    Case("data-pairs-and-lists", "Data", "row 1 a pair, row 2 a ranked list",
         lambda c: c.fit(rows=[GOOD_ROWS[0], LIST_ROWS[0]]),
         ["<tmp>/pairs.jsonl: row 2: is a ranked list of strings but row 1 is standard (strings); use one shape per file"]),
    Case("data-all-tied", "Data", "every list's completions have equal scores",
         lambda c: c.fit(rows=[{"prompt": "Q:", "completions": [" a", " b"], "scores": [2, 2]}]),
         ["train (<tmp>/pairs.jsonl): no list implies a pair (1 read; 1 tied pairs, 0 between identical completions, "
          "0 completions longer than data.max_length=64); check the scores/ranks columns"]),
    Case("data-eval-empty", "Data", "`data.eval.path` an empty file",
         lambda c: c.fit(data={"eval": {"path": str(c.data([], name="eval.jsonl"))}}),
         ["eval (<tmp>/eval.jsonl): no rows to read; check data.eval.path, where, skip and limit"]),
    Case("data-keep-best-regret-on-pairs", "Data", "`train.keep_best: {metric: bestofk_regret}` with an eval set of pairs (the metric needs ranked lists)",
         lambda c: c.fit(data={"eval": {"path": str(c.data(name="eval.jsonl"))}}, train={"keep_best": {"metric": "bestofk_regret"}}),
         ["train.keep_best: metric bestofk_regret is measured on ranked lists (rows with 'completions' and 'scores' or 'ranks'), "
          "and this run's eval set holds pairs only; keep the best by accuracy or loss"], check=not_completed),
    Case("data-eval-all-dropped", "Data", "`data.eval` whose every pair is longer than `max_length` (truncation: filter)",
         lambda c: c.fit(data={"eval": {"path": str(c.data(
             [{"prompt": "Q: " + "why " * 80, "chosen": " Because.", "rejected": " No."}], name="eval.jsonl"))}}),
         ["eval (<tmp>/eval.jsonl): every pair is longer than data.max_length=64 (the longest sequence has "]),
    # Runtime --------------------------------------------------------------------------------------
    Case("out-of-memory-first-step", "Runtime", "the first forward pass cannot allocate its memory (a real allocator failure, injected into the model's forward)",
         lambda c: c.fit(),
         ["out of memory at step 1 in a forward/backward pass of 2 pair(s), 32 tokens (2 rows x 16; "
          "train.per_device_batch_size: 2, train.max_tokens_per_forward: auto = 32768); set train.max_tokens_per_forward "
          "below 32 (same gradient, smaller passes), or lower train.per_device_batch_size and raise "
          "train.gradient_accumulation_steps to keep 2 pairs per step"],
         patch=allocation_fails(in_training_only=True), check=not_completed),
    Case("out-of-memory-model", "Runtime", "the model's very first forward (the check of segment attention, before training) cannot allocate",
         lambda c: c.fit(),
         ["out of memory in the first forward of the model (checking segment attention on two short rows): "
          "the model alone does not fit this device; use a smaller model, a device with more memory, or LoRA"],
         patch=allocation_fails(in_training_only=False), check=not_completed),
    Case("disk-full-checkpoint", "Runtime", "the disk fills while checkpoint-2 is written (`save_steps: 1`; simulated: torch.save writes 1 KiB, then fails with ENOSPC)",
         lambda c: c.fit(train={"max_steps": 3, "save_steps": 1}),
         ["train.output_dir: could not write checkpoint-2 in <tmp>/run (No space left on device); the newest complete "
          "checkpoint <tmp>/run/checkpoints/checkpoint-1 is intact: free space and run again with --resume"],
         patch=disk_fills_during_second_checkpoint, check=previous_checkpoint_intact),
    Case("disk-full-final-save", "Runtime", "the disk fills while the final model is written (simulated as above)",
         lambda c: c.fit(train={"max_steps": 2, "save_steps": 1}),
         ["train.output_dir: could not write the final model in <tmp>/run (No space left on device); the newest complete "
          "checkpoint <tmp>/run/checkpoints/checkpoint-1 is intact: free space and run again with --resume"],
         patch=disk_fills_during_final_save, check=final_save_left_nothing_half_written),
    Case("output-dir-not-writable", "Runtime", "`train.output_dir: /sys/rmtrain-run` (nothing can be created there, even as root)",
         lambda c: c.fit(train={"output_dir": "/sys/rmtrain-run"}),
         ["train.output_dir: /sys/rmtrain-run is not writable (Permission denied in /sys); choose a folder you can write to"],
         check=nothing_created_in_sys),
    Case("output-dir-holds-a-run", "Runtime", "`train.output_dir` holds an earlier run, no `--resume`/`--overwrite`",
         existing_run,
         ["train.output_dir: <tmp>/run already holds a run; pass --resume to continue it or --overwrite to replace it"],
         check=untouched),
    Case("resume-with-other-data", "Runtime", "`--resume` after the training data changed (other token ids: the checkpoint's embedding rows no longer fit)",
         resume_with_other_data,
         ["<tmp>/run/checkpoints/checkpoint-1: trained 20 embedding rows, this run's training data gives 17 "
          "(train.embedding_rows: seen); resume with the data and settings the run started with"],
         check=untouched),
    Case("resume-nothing-to-resume", "Runtime", "`--resume` where `train.output_dir` does not exist yet",
         lambda c: [*c.fit(), "--resume"],
         ["train.output_dir: --resume, but <tmp>/run holds no run to resume from; run without --resume to start "
          "(or with --overwrite to replace what is there)"]),
    Case("output-dir-foreign-files", "Runtime", "`train.output_dir` a non-empty folder that is not a run",
         foreign_folder,
         ["train.output_dir: <tmp>/run is not empty and holds no rmtrain run; choose another folder"],
         check=untouched),
]

CASES += [
    # Model folders given to eval, score and export ---------------------------------------------------
    Case("eval-not-a-model", "eval, score, export, serve, plot, binarize", "`rmtrain eval` on a folder that holds neither a model nor a run",
         lambda c: ["eval", str(notes_folder(c)), "--data", str(c.data())],
         ["<tmp>/notes: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json); give a finished run "
          "or a model folder"]),
    Case("score-missing-folder", "eval, score, export, serve, plot, binarize", "`rmtrain score` on a folder that does not exist",
         lambda c: ["score", str(c.tmp / "no-such-run"), "--data", str(c.data())],
         ["<tmp>/no-such-run: no such model folder; give a finished run or a model folder"]),
    Case("export-unfinished-run", "eval, score, export, serve, plot, binarize", "`rmtrain export` on a run that has not finished (killed: checkpoints, no final model)",
         unfinished_run,
         ["<tmp>/run: a run that has not finished (no final model yet); let it finish, or resume it with rmtrain fit --resume"],
         check=nothing_exported),
    Case("export-not-a-model", "eval, score, export, serve, plot, binarize", "`rmtrain export` on a folder that holds neither a model nor a run",
         lambda c: ["export", str(notes_folder(c)), str(c.tmp / "exported")],
         ["<tmp>/notes: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json); give a finished run "
          "or a model folder"], check=nothing_exported_anywhere),
    Case("export-out-not-empty", "eval, score, export, serve, plot, binarize", "`rmtrain export RUN OUT` where OUT already holds files",
         export_into_a_full_folder, ["<tmp>/exported: exists and is not empty; choose a new folder"], check=exported_folder_kept),
    Case("eval-adapter-base-moved", "eval, score, export, serve, plot, binarize", "`rmtrain eval` on a LoRA adapter whose base model folder is gone",
         adapter_without_its_base, ["<tmp>/adapter: its base model '<tmp>/moved-base' (adapter_config.json base_model_name_or_path) "
                                    "is not there; put it back, or fix that path"]),
    Case("serve-without-extra", "eval, score, export, serve, plot, binarize", "`rmtrain serve` without the `serve` extra (FastAPI blocked from importing)",
         lambda c: ["serve", c.models["tiny-qwen3"]],
         ["rmtrain serve needs fastapi, which is not installed: pip install 'rmtrain[serve]'"], patch=block_fastapi_import),
    Case("serve-port-taken", "eval, score, export, serve, plot, binarize", "`rmtrain serve --port P` where another process listens on P",
         port_taken, ["--host 127.0.0.1 --port <port>: cannot listen there (Address already in use); pick another port"]),
    Case("serve-truncated-weights", "eval, score, export, serve, plot, binarize", "`rmtrain serve` on a folder whose `model.safetensors` is cut short",
         truncated_weights, ["<tmp>/truncated: cannot load the model: "]),
    Case("serve-host-everywhere", "eval, score, export, serve, plot, binarize", "`rmtrain serve MODEL --host \"\"` (every interface, unsaid)",
         lambda c: ["serve", c.models["tiny-qwen3"], "--host", ""],
         ["--host '': to listen on every interface, say so: --host 0.0.0.0 (and set --api-key)"]),
    Case("plot-not-a-run", "eval, score, export, serve, plot, binarize", "`rmtrain plot` on a folder without metrics.jsonl",
         lambda c: ["plot", str(notes_folder(c)), "--out", str(c.tmp / "curves.png")],
         ["<tmp>/notes: no metrics.jsonl (is it an rmtrain run folder?)"]),
    Case("plot-out-not-an-image", "eval, score, export, serve, plot, binarize", "`rmtrain plot RUN --out curves.txt`",
         lambda c: ["plot", str(notes_folder(c)), "--out", str(c.tmp / "curves.txt")],
         ["--out: <tmp>/curves.txt: expected an image file ending in .png, .pdf, .svg"]),
    Case("score-out-is-a-folder", "eval, score, export, serve, plot, binarize", "`rmtrain score MODEL --out FOLDER` (an existing folder)",
         lambda c: ["score", str(c.tmp / "no-such-run"), "--data", str(c.data()), "--out", str(c.tmp)],
         ["--out: <tmp> is a folder; give a file to write the JSON lines to (or - for standard output)"]),
    Case("binarize-out-exists", "eval, score, export, serve, plot, binarize", "`rmtrain binarize LISTS OUT` where OUT exists, no `--overwrite`",
         existing_pairs_file, ["<tmp>/pairs.jsonl: exists; pass --overwrite to replace it, or choose another file"], check=pairs_file_kept),
    Case("eval-second-model-not-a-model", "eval, score, export, serve, plot, binarize", "`rmtrain eval MODEL FOLDER` where the second folder holds no model (checked before anything is scored)",
         lambda c: ["eval", c.models["tiny-qwen3"], str(notes_folder(c)), "--data", str(c.data())],
         ["<tmp>/notes: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)"]),
    Case("eval-second-model-base-moved", "eval, score, export, serve, plot, binarize", "`rmtrain eval MODEL ADAPTER` where the adapter's base model folder is gone (checked before the first model is scored)",
         second_model_adapter_without_its_base,
         ["<tmp>/adapter: its base model '<tmp>/moved-base' (adapter_config.json base_model_name_or_path) is not there; "
          "put it back, or fix that path"]),
    Case("eval-bootstrap-negative", "eval, score, export, serve, plot, binarize", "`rmtrain eval --bootstrap -5`",
         lambda c: ["eval", c.models["tiny-qwen3"], "--data", str(c.data()), "--bootstrap", "-5"],
         ["--bootstrap: expected 0 (no intervals) or at least 2 resamples, got -5"]),
    Case("eval-rewardbench2-empty-rejected", "eval, score, export, serve, plot, binarize", "RewardBench 2 rows (`chosen` and `rejected` lists), one with `rejected: []`",
         lambda c: ["eval", c.models["tiny-qwen3"], "--data", str(c.data(RB2_ROWS[:1] + [{**RB2_ROWS[0], "rejected": []}], name="rb2.jsonl"))],
         ["<tmp>/rb2.jsonl: row 2: 'rejected' must be a non-empty list of completions, as in every row of a RewardBench 2 file, "
          "got an empty list"]),
    Case("eval-rewardbench2-ties-id", "eval, score, export, serve, plot, binarize", "a RewardBench 2 Ties row whose `id` is not `ref:N` or `tied:N`",
         lambda c: ["eval", c.models["tiny-qwen3"], "--data", str(c.data(RB2_ROWS + [{**RB2_ROWS[1], "id": "tied-3"}], name="rb2.jsonl"))],
         ["<tmp>/rb2.jsonl: row 3: a Ties row needs an 'id' of the form ref:N or tied:N (RewardBench 2), got 'tied-3'"]),
    # Ensembles and weight averaging --------------------------------------------------------------------
    Case("recipe-heads-zero", "Recipe", "`model.heads: 0`",
         lambda c: c.fit(model={"heads": 0}), ["model.heads: must be >= 1, got 0"], runner="process"),
    Case("recipe-head-bootstrap-one-head", "Recipe", "`train.head_bootstrap: true` with one head",
         lambda c: c.fit(train={"head_bootstrap": True}),
         ["train.head_bootstrap: needs model.heads >= 2 (each head its own bootstrap sample)"], runner="process"),
    Case("score-aggregate-unknown", "eval, score, export, serve, plot, binarize", "`rmtrain score MODEL --aggregate max`",
         lambda c: ["score", c.models["tiny-qwen3"], "--data", str(c.data()), "--aggregate", "max"],
         ["--aggregate: 'max' is not an aggregate; expected mean, min, or mean-std:LAMBDA (e.g. mean-std:1.0)"]),
    Case("ensemble-one-member", "Ensembles", "`rmtrain ensemble RUN --out DIR` (one member)",
         lambda c: ["ensemble", c.models["tiny-qwen3"], "--out", str(c.tmp / "joined")],
         ["rmtrain ensemble: give two or more members (finished runs or model folders)"], check=nothing_averaged),
    Case("ensemble-other-tokenizer", "Ensembles", "`rmtrain ensemble` of a Qwen3 and a MiniLM (BERT) folder",
         lambda c: ["ensemble", c.models["tiny-qwen3"], c.models["minilm"], "--out", str(c.tmp / "joined")],
         ["<minilm>: reads text differently from <tiny-qwen3> (vocabulary, special tokens, "], check=nothing_averaged),
    Case("ensemble-other-template", "Ensembles", "`rmtrain ensemble` of two folders whose chat templates differ",
         lambda c: ["ensemble", c.models["tiny-qwen3"], c.models["tiny-qwen3-no-template"], "--out", str(c.tmp / "joined")],
         ["<tiny-qwen3-no-template>: reads text differently from <tiny-qwen3> (chat template differs)"], check=nothing_averaged),
    Case("ensemble-of-an-ensemble", "Ensembles", "`rmtrain ensemble` given an ensemble folder as a member",
         lambda c: ["ensemble", str(an_ensemble_folder(c)), c.models["tiny-qwen3"], "--out", str(c.tmp / "joined")],
         ["<tmp>/ensemble: is an ensemble already; give rmtrain ensemble its members instead"], check=nothing_averaged),
    Case("ensemble-out-exists", "Ensembles", "`rmtrain ensemble A B --out DIR` where DIR exists, no `--overwrite`",
         lambda c: ["ensemble", c.models["tiny-qwen3"], c.models["tiny-qwen3"], "--out", str(notes_folder(c))],
         ["--out: <tmp>/notes exists; pass --overwrite to replace it, or choose another folder"]),
    Case("average-not-a-run", "Ensembles", "`rmtrain average` of a model folder that is not a run (no recipe: its start is unknown)",
         lambda c: ["average", c.models["tiny-qwen3"], c.models["tiny-qwen3"], "--out", str(c.tmp / "averaged")],
         ["<tiny-qwen3>: not a run (no recipe.yaml), so where its weights started is unknown; average finished runs"],
         check=nothing_averaged),
    Case("average-weights-count", "Ensembles", "`rmtrain average A B --weights 1` (one weight for two runs)",
         lambda c: ["average", c.models["tiny-qwen3"], c.models["tiny-qwen3"], "--out", str(c.tmp / "averaged"), "--weights", "1"],
         ["--weights: 1 weight for 2 runs; give one per run"], check=nothing_averaged),
    Case("average-other-bases", "Ensembles", "`rmtrain average` of two runs fine-tuned from different base models",
         runs_of_two_bases,
         ["<tmp>/run-b: fine-tuned from another start than <tmp>/run-a (name_or_path '<tiny-qwen3-no-template>' vs "
          "'<tiny-qwen3>'); average runs of one base"], check=nothing_averaged),
    Case("eval-checkpoint-folder", "eval, score, export, serve, plot, binarize", "`rmtrain eval` on a checkpoint folder instead of its run",
         lambda c: (unfinished_run(c), ["eval", str(c.out / "checkpoints" / "checkpoint-2"), "--data", str(c.data())])[1],
         ["<tmp>/run/checkpoints/checkpoint-2: a training checkpoint (for --resume), not a model; use the run's folder "
          "once it has finished"], check=untouched),
]

OBSERVED: dict[str, tuple[int, list[str]]] = {}
"""case id -> (exit status, the lines the doc shows), filled by test_user_error for the doc test."""


# --------------------------------------------------------------------------------------------------
# Running a case.


@pytest.fixture(scope="module")
def models(tiny_qwen3, smollm2, minilm, tmp_path_factory) -> dict[str, str]:
    # The tiny Qwen3 without its chat template file (the files are links, so this costs nothing).
    bare = tmp_path_factory.mktemp("models") / "tiny-qwen3-no-template"
    bare.mkdir()
    for item in Path(tiny_qwen3).iterdir():
        if item.name != "chat_template.jinja":
            (bare / item.name).symlink_to(item)
    assert "chat_template" not in (bare / "tokenizer_config.json").read_text()
    return {"tiny-qwen3": tiny_qwen3, "tiny-qwen3-no-template": str(bare), "smollm2": smollm2[0], "smollm2-gguf": smollm2[1],
            "minilm": minilm}


def run_in_process(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from rmtrain.cli import app

    result = CliRunner().invoke(app, args, prog_name="rmtrain")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # what Python prints when it escapes
    return result.exit_code, stderr


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process fit starts from a clean Accelerate state, as a fresh process would."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def normalise(text: str, ctx: Ctx) -> str:
    replacements = {str(ctx.tmp): "<tmp>", ctx.models["tiny-qwen3-no-template"]: "<tiny-qwen3-no-template>",
                    ctx.models["tiny-qwen3"]: "<tiny-qwen3>", ctx.models["smollm2"]: "<smollm2>", ctx.models["minilm"]: "<minilm>", str(ROOT): "<repo>"}
    for path in sorted(replacements, key=len, reverse=True):
        text = text.replace(path, replacements[path])
    return re.sub(r"--port \d+", "--port <port>", text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error(case: Case, tmp_path, models, monkeypatch, fresh_accelerate_state):
    ctx = Ctx(tmp_path, models)
    args = case.setup(ctx)
    start = time.monotonic()
    if case.runner == "process":
        assert case.patch is None, "a patch only reaches an in-process run"
        result = rmtrain_cli(*args, timeout=120)  # from the repository root: this checkout's rmtrain
        status, stderr = result.returncode, result.stderr
    else:
        monkeypatch.setenv("COLUMNS", "1000")  # console lines unwrapped
        if case.patch is not None:
            case.patch(ctx, monkeypatch)
        status, stderr = run_in_process(args)
        monkeypatch.undo()
    seconds = time.monotonic() - start
    stderr = normalise(stderr, ctx)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if case.status == 0:
        shown = [line for line in stderr.splitlines() if any(fragment in line for fragment in case.expect)]
    else:
        shown = errors
    OBSERVED[case.id] = (status, shown)

    assert "Traceback" not in stderr, stderr[-3000:]
    assert status == case.status, stderr[-3000:]
    if case.status == 0:
        assert errors == [], stderr[-3000:]
        assert len(shown) == len(case.expect), stderr[-3000:]
    else:
        assert len(errors) == len(case.expect), (case.why_lines, stderr[-3000:])
        assert (len(errors) > 1) == bool(case.why_lines)
        for fragment in case.expect:
            assert sum(fragment in line for line in errors) == 1, (fragment, errors)
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, f"took {seconds:.0f} s"
    if case.check is not None:
        case.check(ctx)
    else:
        assert not ctx.out.exists(), "a failed run must not start its output folder"


# --------------------------------------------------------------------------------------------------
# docs/errors.md, rendered from what the cases printed.


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_doc() -> str:
    out = [
        "# Errors",
        "",
        "<!-- Generated by tests/test_errors.py from what rmtrain printed; do not edit. "
        "RMTRAIN_UPDATE_ERRORS_DOC=1 pytest tests/test_errors.py rewrites it. -->",
        "",
        "Every bad input, on every command, ends with exit status 2 and one `error:` line on stderr that names the "
        "file, YAML key, row or folder, what was expected and how to fix it; `--debug` shows the Python traceback instead. "
        "Nothing already on disk is lost: a refused output folder is left untouched, and a save that fails "
        "leaves the previous checkpoint complete. The lines below are what each case of `tests/test_errors.py` "
        "printed (`<tmp>` stands for the test's folder, `<tiny-qwen3>` for the tiny test model). Cases with "
        "exit status 0 are handled, not refused: the line shown is the pre-flight line that counts them. "
        "`run` says how the test ran the CLI: `process` is `python -m rmtrain` in a fresh process, `in-process` "
        "the same Typer app inside the test process (cases past the recipe check, which import torch, and cases "
        "that make the machine fail on purpose).",
        "",
        "`train.bf16: true` on a device without bf16 support is an error rather than a silent fallback to fp32; "
        "`train.bf16: null` (the default) uses bf16 only where it is supported. torch supports bf16 autocast on "
        "every CPU, so `bf16: true` on a CPU runs in bf16.",
    ]
    for section in dict.fromkeys(c.section for c in CASES):
        out += ["", f"## {section}", "", "| case | input | run | exit | message |", "|---|---|---|---|---|"]
        out += [case_row(case) for case in CASES if case.section == section]
    return "\n".join(out) + "\n"


def case_row(case) -> str:
    """A case's row of the doc's table, from what it printed in this session."""
    status, lines = OBSERVED[case.id]
    message = "<br>".join(f"`{cell(line)}`" for line in lines)
    return f"| {case.id} | {cell(case.input)} | {case.runner} | {status} | {message} |"


def test_errors_doc_is_current():
    """Each case that ran in this session has its row in docs/errors.md as it printed it (whichever ran: under `-k`
    or `--lf` the cases that ran are checked), and the doc has a row for every case and for no other."""
    if os.environ.get("RMTRAIN_UPDATE_ERRORS_DOC") == "1":
        missing = [c.id for c in CASES if c.id not in OBSERVED]
        assert not missing, f"rewriting the doc needs every case to run (not run: {', '.join(missing)})"
        DOC.write_text(render_doc())
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| case ")}
    assert sorted(rows) == sorted(c.id for c in CASES), "docs/errors.md lists other cases than tests/test_errors.py"
    stale = [c.id for c in CASES if c.id in OBSERVED and rows[c.id] != case_row(c)]
    assert not stale, (
        f"docs/errors.md differs from what these cases printed: {', '.join(stale)}; "
        "rewrite it with RMTRAIN_UPDATE_ERRORS_DOC=1 pytest tests/test_errors.py"
    )
