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
    assert "model.init_kwargs.num_labels: a reward model always has num_labels=1" in joined
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


def test_readme_documents_every_recipe_key():
    """The README's key tables cannot drift from the dataclasses."""
    import dataclasses

    from rmtrain.config import DataConfig, DataSource, LoraConfig, ModelConfig, TrainConfig

    readme = (ROOT / "README.md").read_text()
    for cls in (ModelConfig, DataConfig, DataSource, LoraConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"README does not document {cls.__name__}.{f.name}"


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
