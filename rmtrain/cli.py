"""Typer commands. No logic here: parse, call, turn known errors into one clear line and exit status 2."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

from rmtrain.errors import DataError, ExportError, UserError, require_extra

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate reward models for RLHF.")

def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets is read at its import, which only Hub, parquet and CSV sources need (a second of start-up otherwise).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(debug: bool, action) -> None:
    """Bad input (a UserError) is reported as "error: where: what" lines with exit status 2, no traceback
    unless --debug."""
    try:
        action()
    except UserError as error:
        if debug:
            raise
        for line in error.lines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


@app.command()
def fit(
    recipe: str = typer.Argument(..., help="YAML recipe, e.g. recipes/demo.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.learning_rate=3e-5"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.output_dir from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in train.output_dir."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Train a reward model from a recipe."""

    def action() -> None:
        from rmtrain.config import load_recipe

        loaded = load_recipe(recipe, overrides or [])  # checked before anything heavy is imported
        _quiet_libraries()
        from rmtrain.train import fit as run_fit

        run_fit(loaded, resume=resume, overwrite=overwrite)

    _run(debug, action)


AGGREGATE_HELP = (
    "An ensemble's one reward: mean, min (worst case) or mean-std:LAMBDA (the mean less LAMBDA times the members' spread); "
    "a single model's reward is every aggregate."
)
MAX_TOKENS_HELP = (
    "Tokens per batch at most (padding included): a number, auto (from the model's size, at least 2048) or none."
)


def tokens_per_forward(value: str) -> int | str | None:
    """The --max-tokens-per-forward option: a number >= 16, auto or none."""
    if value in ("auto", "none"):
        return None if value == "none" else value
    if value.isdigit() and int(value) >= 16:
        return int(value)
    raise DataError(f"--max-tokens-per-forward: expected a number >= 16, auto or none, got {value!r}")


def aggregate_option(text: str):
    """The --aggregate option, parsed (rmtrain.aggregate imports torch: only once a command runs)."""
    from rmtrain.aggregate import Aggregate

    return Aggregate.parse(text)


@app.command("eval")
def eval_command(
    models: List[str] = typer.Argument(..., help="Saved model or run folders (full model or LoRA adapter); several are compared on the same rows."),
    data: Optional[str] = typer.Option(None, "--data", help="Pairs, lists or RewardBench 2 rows: local file/folder or Hub dataset id (default: a run's own eval sources, each on its own)."),
    split: str = typer.Option("train", "--split", help="Split (Hub datasets)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Defaults to the length the model was trained with."),
    truncation: Optional[str] = typer.Option(None, "--truncation", help="filter (drop longer pairs, as TRL; the default with --data) or truncate; a run's own eval sources default to the run's."),
    batch_size: int = typer.Option(16, "--batch-size", help="Pairs per batch."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics to this JSON file."),
    subset_field: Optional[str] = typer.Option(
        None, "--subset-field", help="Column naming each row's subset, for per-subset accuracy (default: 'subset' if present)."
    ),
    report: Optional[str] = typer.Option(
        None, "--report", help="Folder for metrics.json, pairs.jsonl (per-pair rewards) and PNG plots."
    ),
    max_tokens: str = typer.Option("auto", "--max-tokens-per-forward", help=MAX_TOKENS_HELP),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Resamples of prompts for the 95% intervals and paired differences (0: none)."),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="Seed of the resamples: the same seed, the same intervals."),
    aggregate: str = typer.Option("mean", "--aggregate", help=AGGREGATE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Evaluate saved reward models on preference pairs, ranked lists or RewardBench 2 rows; several side by side."""

    def action() -> None:
        if batch_size < 1 or (max_length is not None and max_length < 1):
            raise DataError("--batch-size and --max-length must be >= 1")
        if truncation not in (None, "filter", "truncate"):
            raise DataError(f"--truncation: expected filter or truncate, got {truncation!r}")
        if bootstrap < 0 or bootstrap == 1:
            raise DataError(f"--bootstrap: expected 0 (no intervals) or at least 2 resamples, got {bootstrap}")
        if not 0 <= bootstrap_seed < 2**63:
            raise DataError(f"--bootstrap-seed: expected a number in [0, 2^63), got {bootstrap_seed}")
        reading = aggregate_option(aggregate)
        tokens = tokens_per_forward(max_tokens)
        _quiet_libraries()
        from rmtrain.evaluate import run_eval

        run_eval(models, data, split, max_length, truncation, batch_size, json_out, subset_field, report, None, tokens,
                 bootstrap, bootstrap_seed, reading)

    _run(debug, action)


@app.command()
def score(
    model: str = typer.Argument(..., help="A saved model, run or exported folder (full model or LoRA adapter)."),
    data: str = typer.Option(..., "--data", help="Rows to score: 'text', 'messages', or 'prompt' + 'completion'/'response'."),
    out: str = typer.Option("-", "--out", help="JSON lines {row, reward, tokens}; '-' is stdout."),
    field: Optional[str] = typer.Option(None, "--field", help="Score this one column (a string or a message list) of every row."),
    split: str = typer.Option("train", "--split", help="Split (Hub datasets)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longer inputs keep their last tokens; defaults to the trained length."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per batch."),
    in_order: bool = typer.Option(False, "--in-order", help="Write lines in input order (buffered) instead of as batches finish."),
    max_tokens: str = typer.Option("auto", "--max-tokens-per-forward", help=MAX_TOKENS_HELP),
    aggregate: str = typer.Option("mean", "--aggregate", help=AGGREGATE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Score single responses (plain text or chat messages) with a saved reward model."""

    def action() -> None:
        if batch_size < 1 or (max_length is not None and max_length < 1):
            raise DataError("--batch-size and --max-length must be >= 1")
        tokens = tokens_per_forward(max_tokens)
        reading = aggregate_option(aggregate)
        _quiet_libraries()
        from rmtrain.score import run_score

        run_score(model, data, out, field, split, max_length, batch_size, in_order, None, tokens, reading)

    _run(debug, action)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="A run folder (full model or LoRA adapter)."),
    out_dir: str = typer.Argument(..., help="Where to write a plain transformers model folder."),
    merge: bool = typer.Option(False, "--merge", help="Fold LoRA weights into the base model."),
    normalize: bool = typer.Option(False, "--normalize", help="Fold the eval rewards' mean and std into the head: rewards become (r - mean) / std."),
    data: Optional[str] = typer.Option(None, "--data", help="Preference pairs for the statistics and the check, instead of the run's eval set."),
    check: bool = typer.Option(True, "--check/--no-check", help="Reload the folder with plain transformers in a fresh process and compare rewards."),
    check_pairs: int = typer.Option(16, "--check-pairs", help="Rows (pairs or lists) compared by the check."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Write a folder that plain AutoModelForSequenceClassification and AutoTokenizer load, checked."""

    def action() -> None:
        if check_pairs < 1:
            raise ExportError("--check-pairs must be >= 1")
        _quiet_libraries()
        from rmtrain.export import export_model

        export_model(run_dir, out_dir, merge, normalize, data, check, check_pairs)

    _run(debug, action)


@app.command()
def serve(
    model: str = typer.Argument(..., help="A finished run or an exported folder (full model or LoRA adapter)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; set --api-key then)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    max_tokens: str = typer.Option("auto", "--max-tokens-per-forward", help=MAX_TOKENS_HELP),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a round waits for more requests to share its batches (it starts early once every open connection has sent one)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per batch at most; a larger request is scored in rounds of this many, interleaved with others."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longer inputs keep their last tokens; defaults to the trained length."),
    share_prefix: bool = typer.Option(True, "--share-prefix/--no-share-prefix", help="Decoders: a group's prompt computed once."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Every route but /health needs 'Authorization: Bearer KEY' (default: $RMTRAIN_API_KEY)."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="A larger request body is refused (413)."),
    max_texts: int = typer.Option(4096, "--max-texts-per-request", help="A request of more texts is refused (413)."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", help="Seconds a client may stall while sending its headers or body."),
    graceful_timeout: float = typer.Option(30.0, "--graceful-timeout", help="Seconds SIGTERM/SIGINT wait for the requests in flight."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's name in /v1/models and answers (default: MODEL)."),
    aggregate: str = typer.Option("mean", "--aggregate", help=AGGREGATE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Serve rewards over HTTP for RL workers: OpenRLHF's /get_reward, vLLM's /classify (verl), SGLang's /v1/embeddings,
    LLaMA-Factory's /v1/score/evaluation, and /score for a prompt's completions."""

    def action() -> None:
        if batch_size < 1 or max_wait_ms < 0 or not 0 < port < 65536 or (max_length is not None and max_length < 1):
            raise DataError("--batch-size and --max-length must be >= 1, --max-wait-ms >= 0, --port between 1 and 65535")
        if max_body_mb <= 0 or max_texts < 1 or read_timeout <= 0 or graceful_timeout < 0:
            raise DataError("--max-body-mb and --read-timeout must be > 0, --max-texts-per-request >= 1, --graceful-timeout >= 0")
        tokens = tokens_per_forward(max_tokens)
        reading = aggregate_option(aggregate)
        require_extra("serve", ("fastapi", "uvicorn"), "rmtrain serve")  # before anything heavy loads
        _quiet_libraries()
        from rmtrain.log import RunLog
        from rmtrain.serve import Door, api_key_from
        from rmtrain.serve import serve as run_serve

        door = Door(max_body_bytes=int(max_body_mb * (1 << 20)), read_timeout_s=read_timeout, api_key=api_key_from(api_key))
        run_serve(model, host, port, tokens, max_wait_ms, batch_size, max_length, share_prefix, RunLog(), door, max_texts,
                  graceful_timeout, served_model_name, reading)

    _run(debug, action)


@app.command()
def ensemble(
    members: List[str] = typer.Argument(..., help="Two or more finished runs or model folders: one tokenizer, one architecture."),
    out: str = typer.Option(..., "--out", help="The ensemble folder to write (score, eval and serve read it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Make one folder of several reward models, scored as an ensemble (LoRA adapters on one base keep the base once)."""

    def action() -> None:
        _quiet_libraries()
        from rmtrain.ensemble import make_ensemble

        make_ensemble(members, out, overwrite)

    _run(debug, action)


@app.command()
def average(
    runs: List[str] = typer.Argument(..., help="Finished runs fine-tuned from the same base (full or LoRA)."),
    out: str = typer.Option(..., "--out", help="The averaged model folder to write (a plain transformers folder)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per run, comma-separated (normalized to sum to 1); default: equal."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Average the weights of runs from one base into one model (WARM): one model's cost at inference."""

    def action() -> None:
        shares = None
        if weights is not None:
            try:
                shares = [float(w) for w in weights.split(",")]
            except ValueError:
                raise DataError(f"--weights: {weights!r}: expected numbers separated by commas, e.g. 0.5,0.25,0.25") from None
        _quiet_libraries()
        from rmtrain.average import average_runs

        average_runs(runs, out, shares, overwrite)

    _run(debug, action)


@app.command()
def plot(
    runs: List[str] = typer.Argument(..., help="Run folders (or metrics.jsonl files) to overlay."),
    out: str = typer.Option("curves.png", "--out", help="The image to write (.png, .pdf or .svg)."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Train and eval loss, accuracy and margin against step, several runs overlaid (a sweep at a glance)."""

    def action() -> None:
        from pathlib import Path

        from rmtrain.plot import plot_runs

        plot_runs([Path(r) for r in runs], Path(out))
        typer.echo(f"wrote {out}", err=True)

    _run(debug, action)


@app.command()
def binarize(
    lists: str = typer.Argument(..., help="Ranked lists: rows with 'completions' and 'scores' (higher is better) or 'ranks' (1 is best)."),
    out: str = typer.Argument(..., help="Pair rows to write (JSON lines): prompt, chosen, rejected, score_chosen, score_rejected."),
    pairs: str = typer.Option("all", "--pairs", help="all (every pair with different scores), best-worst (one per list) or best-rest."),
    split: str = typer.Option("train", "--split", help="Split (Hub datasets)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Turn ranked lists into preference pairs, as pair datasets are made."""

    def action() -> None:
        from rmtrain.binarize import binarize as run_binarize

        run_binarize(lists, out, pairs, overwrite, split)

    _run(debug, action)


def main() -> None:
    app(prog_name="rmtrain")


if __name__ == "__main__":
    sys.exit(main())
