"""Starting rmtrain as real processes: `python -m rmtrain` or `accelerate launch` with N CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    # Other test runs on the machine may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_command(recipe: Path, *extra: str, num_processes: int = 1, config_file: Path | None = None) -> list[str]:
    """The command line of `rmtrain fit` in one process, or under `accelerate launch` with N CPU processes.

    `--multi_gpu` on a machine without GPUs starts N processes that rmtrain joins into one gloo group
    (`--cpu --num_processes N` would silently start one); callers assert the world size rmtrain reports.
    """
    if num_processes == 1 and config_file is None:
        return [sys.executable, "-m", "rmtrain", "fit", str(recipe), *extra]
    launch = [ACCELERATE, "launch", "--num_processes", str(num_processes), "--num_machines", "1",
              "--main_process_port", str(free_port())]
    if config_file is not None:
        launch += ["--config_file", str(config_file)]
    else:
        launch += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + ["-m", "rmtrain", "fit", str(recipe), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def run_fit(recipe: Path, *extra: str, num_processes: int = 1, config_file: Path | None = None, timeout: int = 600):
    return subprocess.run(
        fit_command(recipe, *extra, num_processes=num_processes, config_file=config_file),
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env(),
    )


def start_fit(recipe: Path, *extra: str, num_processes: int = 1, log: Path, config_file: Path | None = None) -> subprocess.Popen:
    """A fit in its own process group (so a signal or a kill reaches the launcher and all its workers)."""
    handle = log.open("w")
    return subprocess.Popen(
        fit_command(recipe, *extra, num_processes=num_processes, config_file=config_file),
        cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env(), start_new_session=True,
    )


def metrics(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, at once, as a crashed node would lose them.

    Killing the process group is not enough: torch's launcher starts each worker in its own session.
    """
    import psutil

    parent = psutil.Process(process.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
