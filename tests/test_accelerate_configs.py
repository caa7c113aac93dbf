"""The ready Accelerate configs in recipes/accelerate/, through Accelerate's own code: the config loader, the
launcher's environment, and what FSDP/DeepSpeed would do with rmtrain's model. FSDP2 training itself runs in
tests/test_fsdp.py (on CPU processes); what stays untested without GPUs is in docs/multi-gpu.md."""

from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFIGS = ROOT / "recipes" / "accelerate"


def launch_env(config: str, *extra: str) -> tuple[object, dict[str, str]]:
    """The parsed launch arguments and the environment `accelerate launch --config_file` gives each worker."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / config), *extra, "-m", "rmtrain", "fit", "recipe.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        # As `accelerate launch` does before its DeepSpeed launcher (which needs deepspeed installed).
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_config_loads_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "fsdp2-cpu.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED",
                "deepspeed-zero3.yaml": "DEEPSPEED"}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, distributed_type in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert config.distributed_type.value == distributed_type, name
        assert config.num_machines == 1 and config.num_processes == (2 if name == "fsdp2-cpu.yaml" else 8)
    # The CPU config is the GPU one's FSDP2 settings, with the precision left to the recipe.
    gpu, cpu = (load_config_from_file(str(CONFIGS / name)) for name in ("fsdp.yaml", "fsdp2-cpu.yaml"))
    assert gpu.fsdp_config == cpu.fsdp_config and cpu.mixed_precision == "no"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is True
    assert load_config_from_file(str(CONFIGS / "deepspeed-zero3.yaml")).deepspeed_config["zero3_save_16bit_model"] is True


def test_launch_flags_override_the_configs_for_multi_node():
    args, env = launch_env("ddp.yaml", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                           "--num_processes", "16")
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 16)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_wraps_each_decoder_layer_of_the_reward_model(tiny_qwen3, monkeypatch, lora):
    """fsdp.yaml names no layer class: Accelerate's FSDP2 policy reads `_no_split_modules` off rmtrain's model
    (plain or LoRA-wrapped) and wraps exactly the decoder layers."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from rmtrain.config import LoraConfig, ModelConfig
    from rmtrain.model import load_reward_model

    _, env = launch_env("fsdp.yaml", "--num_processes", "2")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3), LoraConfig(r=4) if lora else None, False)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, rm.model)
    wrapped = [type(m).__name__ for m in rm.model.modules() if policy(m)]
    base = rm.model.get_base_model() if lora else rm.model
    assert wrapped == ["Qwen3DecoderLayer"] * base.config.num_hidden_layers


@pytest.mark.parametrize("config", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_deepspeed_auto_values_come_from_the_recipe(config, monkeypatch):
    """The DeepSpeed plugin Accelerate builds from the launcher's environment leaves the micro-batch size and
    clipping "auto"; rmtrain fills them from train.* (length-grouped loaders expose no batch size)."""
    from accelerate.utils import DeepSpeedPlugin

    from rmtrain.config import TrainConfig
    from rmtrain.engine import fill_deepspeed_auto

    _, env = launch_env(config, "--num_processes", "2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == int(config[-6])
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_clipping"] == "auto"
    fill_deepspeed_auto(ds, TrainConfig(per_device_batch_size=3, max_grad_norm=0.5))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
    if config == "deepspeed-zero3.yaml":
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # full final folder


def test_lora_final_save_from_a_gathered_full_state_dict(tiny_qwen3, tmp_path):
    """Under FSDP/ZeRO-3 the final save passes the gathered full state dict (base + adapter + head, the keys
    `accelerator.get_state_dict` returns) to PEFT, which must keep exactly the adapter and the head."""
    import torch
    from safetensors.torch import load_file

    from rmtrain.config import LoraConfig, ModelConfig
    from rmtrain.model import load_reward_model
    from rmtrain.saved import save_model_folder

    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3), LoraConfig(r=4), False)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # trained-looking adapter (lora_B starts at zero) and head
    full = {k: v.clone() for k, v in rm.model.state_dict().items()}
    assert any("lora_" in k for k in full) and any(".layers.0.self_attn.q_proj.base_layer" in k for k in full)
    save_model_folder(rm.model, full, rm.tokenizer, rm.fmt, 256, tmp_path / "gathered")
    save_model_folder(rm.model, None, rm.tokenizer, rm.fmt, 256, tmp_path / "direct")
    gathered = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    direct = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    assert sorted(gathered) == sorted(direct) and any("score" in k for k in direct)
    assert all(torch.equal(gathered[k], direct[k]) for k in direct)
