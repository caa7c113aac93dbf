"""The command line as a user meets it: one clear `error:` line per problem (exit status 2, no traceback),
output-folder protection, `key=value` overrides, and every documented way to launch rmtrain."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, rmtrain_cli, write_recipe

BIN = Path(sys.executable).parent
ACCELERATE = str(BIN / "accelerate")
PACKAGE_DIR = ROOT / "rmtrain"
# Modules of the package folder that would shadow libraries if the folder itself were on sys.path.
PACKAGE_MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))

# Imported at start-up by every Python process started with PROBE_DIR on PYTHONPATH (there is no other
# sitecustomize in the venv). At exit it records, per process, what the package folder could shadow.
PROBE_SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, importlib.util, json, os, sys

    def _rmtrain_probe():
        pkg = os.path.realpath(os.environ["RMTRAIN_PROBE_PKG"])
        inside = lambda f: bool(f) and os.path.realpath(f).startswith(pkg + os.sep)
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        record = {
            "argv": sys.argv,
            "main": main and os.path.realpath(main),
            "pkg_dir_on_path": [p for p in sys.path if os.path.realpath(p or os.curdir) == pkg],
            # top-level names that would resolve to a file of the package folder
            "shadowing": [
                n for n in os.environ["RMTRAIN_PROBE_NAMES"].split(",")
                if inside(getattr(importlib.util.find_spec(n), "origin", None))
            ],
            # modules actually loaded from the package folder under a name outside the package
            "loaded_as_top_level": [
                n for n, m in list(sys.modules.items())
                if m is not sys.modules.get("__main__")  # also aliased as __mp_main__ by multiprocessing
                and not n.startswith("rmtrain") and inside(getattr(m, "__file__", None))
            ],
            "heavy_imported": [m for m in ("torch", "transformers", "datasets", "accelerate") if m in sys.modules],
        }
        with open(os.path.join(os.environ["RMTRAIN_PROBE_OUT"], f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    if os.environ.get("RMTRAIN_PROBE_OUT"):
        atexit.register(_rmtrain_probe)
    """
)


# --------------------------------------------------------------------------------------------------
# Helpers


def run(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})}
    )


def run_together(*commands: list[str], cwd: Path = ROOT, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Like run() for each command, but the processes run at the same time (they mostly wait on imports)."""
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def probe_env(tmp_path: Path) -> tuple[dict, Path]:
    probe_dir, out = tmp_path / "probe_site", tmp_path / "probe_out"
    probe_dir.mkdir()
    out.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE_SITECUSTOMIZE)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])),
        "RMTRAIN_PROBE_OUT": str(out),
        "RMTRAIN_PROBE_PKG": str(PACKAGE_DIR),
        "RMTRAIN_PROBE_NAMES": ",".join(PACKAGE_MODULES),
    }
    return env, out


def probe_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def rmtrain_record(out: Path) -> dict:
    """The probe record of the process that ran rmtrain (accelerate launch adds a parent process)."""
    records = probe_records(out)
    mine = [r for r in records if Path(r["argv"][0]).name in ("rmtrain", "__main__.py")]
    assert len(mine) == 1, records
    return mine[0]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_user_error(result: subprocess.CompletedProcess, count: int) -> list[str]:
    """Exit status 2, exactly `count` `error:` lines, no traceback; returns the lines."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == count, result.stderr[-3000:]
    return lines


def tiny_recipe(model: str, data_dir: Path, out: Path, **train) -> dict:
    """A fit of a second or two: tiny Qwen3, 4 HH pairs (from data_dir, the shared data) cut to 128 tokens."""
    return {
        "model": {"name_or_path": model},
        "data": {
            "train": {"path": str(data_dir / "hh_harmless_test.jsonl"), "limit": 4},
            "max_length": 128,
            "truncation": "truncate",
        },
        "train": {
            "output_dir": str(out),
            "per_device_batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "gradient_checkpointing": False,
            **train,
        },
    }


def recipe_file(folder: Path, tree: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder, tree)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder` with its mtime and (for files) content hash."""
    state = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        state[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_size if p.is_file() else 0, digest)
    return state


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def script_fit(tmp_path_factory, tiny_qwen3, shared_data):
    """One real tiny fit, launched as `python rmtrain fit R.yaml key=value ...` from the repository root (the
    package folder run as a script, as `accelerate launch rmtrain` does), under the shadowing probe.

    The recipe says 2 steps at 1e-4; the command line overrides them to 1 step at 3e-5.
    Returns (run folder, probe record of the rmtrain process).
    """
    base = tmp_path_factory.mktemp("script_fit")
    env, probe_out = probe_env(base)
    out = base / "run"
    recipe = recipe_file(base / "recipe", tiny_recipe(tiny_qwen3, shared_data, out))
    result = run([sys.executable, "rmtrain", "fit", str(recipe), "train.max_steps=1", "train.learning_rate=3e-5"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, rmtrain_record(probe_out)


@pytest.fixture(scope="module")
def completed_run(script_fit) -> Path:
    return script_fit[0]


# --------------------------------------------------------------------------------------------------
# 1. Bad recipes: every problem on its own line, the file and YAML path named, before anything loads.


def test_bad_recipe_lists_every_problem_without_traceback(tmp_path):
    missing_model = tmp_path / "no-such-model"
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, {
        "model": {"name_or_path": str(missing_model)},
        "data": {"train": {"path": str(tmp_path / "pairs.jsonl"), "limit": "many"}},
        "train": {"output_dir": str(out), "lerning_rate": 3e-5, "max_steps": 0},
    })
    result = rmtrain_cli("fit", str(recipe))
    lines = assert_user_error(result, 3)
    assert f"error: {recipe}: train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in lines
    assert f"error: {recipe}: train.max_steps: must be >= 1, got 0" in lines
    assert f"error: {recipe}: data.train.limit: expected int or null, got str 'many'" in lines
    # Failed fast: only the recipe's problems, nothing about the missing model, no run folder started.
    assert str(missing_model) not in result.stderr
    assert "rmtrain fit:" not in result.stderr
    assert not out.exists()
    assert result.stdout == ""


def test_bad_recipe_is_reported_without_importing_torch(tmp_path):
    env, out = probe_env(tmp_path)
    recipe = recipe_file(tmp_path / "r", {"train": {"lerning_rate": 1e-4}})
    result = run([sys.executable, "-m", "rmtrain", "fit", str(recipe)], env=env)
    assert result.returncode == 2, result.stderr
    assert rmtrain_record(out)["heavy_imported"] == []


# --------------------------------------------------------------------------------------------------
# 2. Data errors: one line with file and line number; --debug shows the traceback instead.


def test_invalid_jsonl_line_is_one_error_line_and_debug_shows_traceback(tmp_path, tiny_qwen3):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "Hi", "chosen": " hello there", "rejected": " go away"})
    data.write_text(good + "\n" + '{"prompt": "Hi", "chosen": " hello",\n' + good + "\n")
    tree = tiny_recipe(tiny_qwen3, tmp_path, tmp_path / "run", max_steps=1)
    tree["data"]["train"] = {"path": str(data)}
    recipe = recipe_file(tmp_path / "recipe", tree)

    fit = [sys.executable, "-m", "rmtrain", "fit", str(recipe)]
    result, debug = run_together(fit, fit + ["--debug"])
    (line,) = assert_user_error(result, 1)
    assert line.startswith(f"error: {data}: line 2: invalid JSON"), line

    assert debug.returncode not in (0, 2), debug.stderr[-3000:]
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr, debug.stderr[-3000:]
    assert f"{data}: line 2: invalid JSON" in debug.stderr
    assert error_lines(debug.stderr) == []


# --------------------------------------------------------------------------------------------------
# 3. Output folder protection.


@pytest.mark.shared_data
def test_completed_run_is_refused_untouched_and_overwrite_replaces_it(tmp_path, completed_run, tiny_qwen3, shared_data):
    out = tmp_path / "run"
    shutil.copytree(completed_run, out)
    (out / "stale.txt").write_text("from the old run")
    before = snapshot(out)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["learning_rate"] == pytest.approx(3e-5)
    recipe = recipe_file(tmp_path / "recipe", tiny_recipe(tiny_qwen3, shared_data, out, max_steps=1, learning_rate=2e-4))

    (line,) = assert_user_error(rmtrain_cli("fit", str(recipe)), 1)
    assert str(out) in line and "--resume" in line and "--overwrite" in line, line
    assert snapshot(out) == before

    result = rmtrain_cli("fit", str(recipe), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "stale.txt").exists()  # replaced, not written over
    assert run_info(out)["complete"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["learning_rate"] == pytest.approx(2e-4)
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "model.safetensors").stat().st_mtime_ns > before["model.safetensors"][0]


def test_resume_into_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    # A model that cannot load keeps this fast: with the bug the fit gets past the folder check and stops at
    # the model (a real model trains and replaces config.json); refused, it never reaches the model.
    recipe = recipe_file(tmp_path / "recipe", tiny_recipe(str(tmp_path / "no-such-model"), tmp_path, out, max_steps=1))
    (line,) = assert_user_error(rmtrain_cli("fit", str(recipe), "--resume"), 1)
    assert str(out) in line and "not empty" in line, line
    assert (out / "config.json").read_text() == '{"mine": true}\n'


# --------------------------------------------------------------------------------------------------
# 4. key=value overrides.


@pytest.mark.shared_data
def test_overrides_are_applied_and_written_to_the_run_recipe(completed_run):
    """`python rmtrain fit R.yaml train.max_steps=1 train.learning_rate=3e-5` (the script_fit fixture)."""
    written = yaml.safe_load((completed_run / "recipe.yaml").read_text())
    assert written["train"]["max_steps"] == 1  # the recipe file says 2
    assert written["train"]["learning_rate"] == pytest.approx(3e-5)  # the recipe file says 1e-4
    assert run_info(completed_run)["steps"] == 1  # and the run used them


def test_bad_overrides_are_recipe_errors(tmp_path):
    recipe = recipe_file(tmp_path, {
        "model": {"name_or_path": "m"}, "data": {"train": {"path": "d.jsonl"}}, "train": {"output_dir": str(tmp_path / "o")},
    })
    lines = assert_user_error(rmtrain_cli("fit", str(recipe), "train.lerning_rate=3e-5", "train.max_steps=two"), 2)
    assert f"error: {recipe}: train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in lines
    assert f"error: {recipe}: train.max_steps: expected int or null, got str 'two'" in lines
    (line,) = assert_user_error(rmtrain_cli("fit", str(recipe), "train.max_steps"), 1)
    assert line == f"error: {recipe}: override 'train.max_steps': expected key.sub=value"


# --------------------------------------------------------------------------------------------------
# 5. Launch forms, from the repository root.

PACKAGE_MAIN = PACKAGE_DIR / "__main__.py"
CONSOLE_SCRIPT = BIN / "rmtrain"
LAUNCH = [ACCELERATE, "launch", "--num_processes", "1", "--cpu"]
# form -> (command, the file the rmtrain process runs as __main__)
LAUNCH_FORMS = {
    "python -m rmtrain": ([sys.executable, "-m", "rmtrain"], PACKAGE_MAIN),
    "console script": ([str(CONSOLE_SCRIPT)], CONSOLE_SCRIPT),
    "python rmtrain (package folder as a script)": ([sys.executable, "rmtrain"], PACKAGE_MAIN),
    "accelerate launch -m rmtrain": (LAUNCH + ["-m", "rmtrain"], PACKAGE_MAIN),
    "accelerate launch --no_python rmtrain": (LAUNCH + ["--no_python", "rmtrain"], CONSOLE_SCRIPT),
    "accelerate launch rmtrain (package folder as a script)": (LAUNCH + ["rmtrain"], PACKAGE_MAIN),
}


@pytest.mark.parametrize("form", list(LAUNCH_FORMS))
def test_launch_form_help(form, tmp_path):
    env, out = probe_env(tmp_path)
    env["PATH"] = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])  # for --no_python rmtrain
    command, main = LAUNCH_FORMS[form]
    result = run(command + ["--help"], cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage: rmtrain" in result.stdout, result.stdout
    for command in ("fit", "eval", "export"):
        assert f" {command} " in result.stdout, (command, result.stdout)
    record = rmtrain_record(out)
    assert record["main"] == os.path.realpath(main), record
    assert record["pkg_dir_on_path"] == [] and record["shadowing"] == [], record
    assert record["loaded_as_top_level"] == [], record


@pytest.mark.shared_data
def test_python_rmtrain_folder_as_script_fits(script_fit):
    out, record = script_fit  # `python rmtrain fit ...` from the repository root
    assert run_info(out)["complete"] and (out / "model.safetensors").is_file()
    assert record["main"] == str((PACKAGE_DIR / "__main__.py").resolve()), record
    # The libraries it used are the real ones: nothing of the package folder under a top-level name.
    assert "torch" in record["heavy_imported"] and "transformers" in record["heavy_imported"]
    assert record["pkg_dir_on_path"] == [] and record["shadowing"] == [], record
    assert record["loaded_as_top_level"] == [], record


# --------------------------------------------------------------------------------------------------
# 6. rmtrain eval with a missing data file.


def test_eval_missing_data_file(tmp_path, tiny_qwen3):
    missing = tmp_path / "missing.jsonl"
    json_out = tmp_path / "metrics.json"
    result = rmtrain_cli("eval", tiny_qwen3, "--data", str(missing), "--json", str(json_out))
    (line,) = assert_user_error(result, 1)
    assert line == f"error: {missing}: no such file or folder"
    assert not json_out.exists()


@pytest.mark.parametrize("command", ["eval", "score"])
def test_max_tokens_per_forward_option_is_checked_before_anything_loads(tmp_path, command):
    result = rmtrain_cli(command, str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                         "--max-tokens-per-forward", "big")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --max-tokens-per-forward: expected a number >= 16, auto or none, got 'big'"
