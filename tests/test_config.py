"""Recipe loading: every problem listed at once with its YAML path; overrides; every shipped recipe loads."""

from pathlib import Path

import pytest

from rmtrain.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
model: {name_or_path: some/model}
data: {train: {path: pairs.jsonl}}
train: {output_dir: out}
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), list(overrides))
    return info.value.problems


def test_minimal_recipe_gets_trl_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.train.learning_rate == 1e-4
    assert recipe.train.gradient_checkpointing is True
    assert recipe.train.logging_steps == 10
    assert recipe.data.max_length == 1024
    assert recipe.data.truncation == "filter"
    assert recipe.model.disable_dropout is True
    assert recipe.lora is None


def test_every_problem_listed_at_once_with_paths_and_close_matches(tmp_path):
    text = MINIMAL + """
lora: {r: 0, alpah: 16}
"""
    text = text.replace("train: {output_dir: out}", "train: {output_dir: out, learning_rate: -1, per_device_batch_size: 0, lerning_rate: 2}")
    found = problems(tmp_path, text)
    joined = "\n".join(found)
    assert "lora.alpah: unknown key (did you mean 'alpha'?)" in joined
    assert "train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in joined
    assert "lora.r: must be >= 1, got 0" in joined
    assert "train.learning_rate: must be > 0, got -1.0" in joined
    assert "train.per_device_batch_size: must be >= 1, got 0" in joined
    assert len(found) == 5


def test_wrong_types_and_literals(tmp_path):
    text = MINIMAL.replace("train: {output_dir: out}", "train: {output_dir: out, num_epochs: two, bf16: maybe, lr_scheduler: warp}")
    found = problems(tmp_path, text + "\ndata: {train: {path: x}, truncation: chop, max_length: 4}\n")
    joined = "\n".join(found)
    assert "train.num_epochs: expected float, got str 'two'" in joined
    assert "train.bf16: expected bool or null" in joined
    assert "train.lr_scheduler: expected one of" in joined
    assert "data.truncation: expected one of 'filter' | 'truncate', got str 'chop'" in joined
    assert "data.max_length: must be at least 8, got 4" in joined


def test_max_tokens_per_forward_is_a_number_auto_or_null(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL)).train.max_tokens_per_forward == "auto"
    for value, expected in (("4096", 4096), ("null", None), ("auto", "auto")):
        assert load_recipe(write(tmp_path, MINIMAL), [f"train.max_tokens_per_forward={value}"]).train.max_tokens_per_forward == expected
    assert problems(tmp_path, MINIMAL, ["train.max_tokens_per_forward=big"]) == [
        "train.max_tokens_per_forward: expected int or 'auto' or null, got str 'big'"
    ]
    assert problems(tmp_path, MINIMAL, ["train.max_tokens_per_forward=8"]) == [
        "train.max_tokens_per_forward: must be >= 16, auto or null, got 8"
    ]


def test_missing_required_keys_and_num_labels(tmp_path):
    found = problems(tmp_path, "model: {init_kwargs: {num_labels: 2}}\n")
    joined = "\n".join(found)
    assert "model.name_or_path: required" in joined
    assert "model.init_kwargs.num_labels: a reward model's outputs are its heads; remove this key" in joined
    assert "data.train: required" in joined
    assert "train.output_dir: required" in joined


def test_overrides_set_nested_keys_and_are_checked(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.learning_rate=3e-5", "lora.r=8", "data.train.limit=10"])
    assert recipe.train.learning_rate == 3e-5
    assert recipe.lora is not None and recipe.lora.r == 8
    assert recipe.data.train.limit == 10
    # A misspelt key set by an override is an unknown key, with the close match, like one in the file.
    found = problems(tmp_path, MINIMAL, ["train.learning_rat=1"])
    assert found == ["train.learning_rat: unknown key (did you mean 'learning_rate'?)"]
    # An override that is not key=value is named, and stops before the recipe is checked.
    found = problems(tmp_path, MINIMAL, ["train.learning_rat=1", "nonsense"])
    assert found == ["override 'nonsense': expected key.sub=value"]


def test_override_without_equals_is_an_error(tmp_path):
    found = problems(tmp_path, MINIMAL, ["train.learning_rate"])
    assert found == ["override 'train.learning_rate': expected key.sub=value"]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path and recipe.train.output_dir


def test_recipe_doc_has_a_row_for_every_key():
    """docs/recipes.md has one `| key | default | meaning |` table per section (and one for a data source) with a
    row per dataclass field, the key alone in the first cell and a literal default equal to the code's; no row
    names a key the dataclasses do not have. A key mentioned anywhere else in the text does not count."""
    import dataclasses
    import re
    import typing

    import yaml

    from rmtrain.config import DataConfig, DataSource, KeepBest, LoraConfig, ModelConfig, TrainConfig

    sections = {"`model`": ModelConfig, "`data`": DataConfig, "A data source": DataSource, "`lora`": LoraConfig,
                "`train`": TrainConfig}
    tables: dict[str, list[list[str]]] = {}  # heading -> rows of cells (header and separator left out)
    heading, fenced, block = None, False, []
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("|") and not fenced:
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:  # a table just ended
            assert block[0] == ["key", "default", "meaning"], f"{heading}: table header {block[0]}"
            assert heading in sections, f"docs/recipes.md: a key table under '## {heading}', not a section's heading"
            assert heading not in tables, f"docs/recipes.md: two tables under '## {heading}'"
            tables[heading] = block[2:]
            block = []
        if line.startswith("## ") and not fenced:
            heading = line[3:].strip()
    assert set(tables) == set(sections), f"docs/recipes.md: sections without a key table: {set(sections) - set(tables)}"

    for heading, cls in sections.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        documented: dict[str, list[str]] = {}
        for cells in tables[heading]:
            match = re.fullmatch(r"`([a-z0-9_]+)`", cells[0])
            assert match and len(cells) == 3, f"{heading}: a row must be | `key` | default | meaning |, got {cells}"
            key = match.group(1)
            assert key not in documented, f"{heading}: `{key}` has two rows"
            assert key in fields.keys(), f"{heading}: `{key}` is not a key of {cls.__name__}"
            documented[key] = cells
        missing = [name for name in fields if name not in documented]
        assert not missing, f"docs/recipes.md, {heading}: no row for {', '.join(missing)} ({cls.__name__})"
        for name, (_, default, meaning) in documented.items():
            f = fields[name]
            expected = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default == "required":
                assert not expected, f"{heading}: `{name}` documented as required, but defaults to {expected!r}"
            elif re.fullmatch(r"`[^`]+`", default):
                value = yaml.safe_load(default.strip("`"))
                if isinstance(expected, float) and isinstance(value, str):
                    value = float(value)  # YAML 1.1 reads 1e-4 as a string; recipes take it as a float
                assert value == expected and isinstance(value, bool) == isinstance(expected, bool), (
                    f"{heading}: `{name}` documented default {default}, the code's is {expected!r}")
            if name == "keep_best":  # its own keys and values live in its row
                for sub, tp in typing.get_type_hints(KeepBest).items():
                    assert f"{{{sub}: " in meaning, f"`keep_best` row does not show `{sub}`"
                    for option in typing.get_args(tp):
                        assert option in meaning, f"`keep_best` row does not name {sub} {option!r}"


def test_values_that_type_check_but_cannot_train_are_refused_up_front(tmp_path):
    """Each of these would otherwise fail only after the model and data load, in torch, numpy or peft."""
    text = MINIMAL.replace(
        "train: {output_dir: out}",
        "train: {output_dir: out, adam_beta1: 1.0, adam_beta2: -0.1, adam_epsilon: -1, seed: -1, num_epochs: .inf, warmup_ratio: .nan}",
    ).replace("data: {train: {path: pairs.jsonl}}", "data: {train: [a.jsonl, {path: b.jsonl, weight: .inf}]}")
    found = problems(tmp_path, text + "lora: {target_modules: []}\n")
    assert "data.train[0]: expected a mapping" in "\n".join(found)  # a list of paths: named, no traceback
    for line in ("train.adam_beta1: must be in [0, 1), got 1.0", "train.adam_beta2: must be in [0, 1), got -0.1",
                 "train.adam_epsilon: must be >= 0, got -1.0", "train.seed: must be in [0, 2^32), got -1",
                 "train.num_epochs: must be a finite number, got inf", "train.warmup_ratio: must be a finite number, got nan",
                 "data.train[1].weight: must be a finite number, got inf", "lora.target_modules: an empty list; name modules, or all-linear"):
        assert line in found, (line, found)
