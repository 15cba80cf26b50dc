"""The accelerate set-ups the trainer refuses fail before any model loads, with the setting to change; the
accelerate configs shipped in configs/accelerate/ pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

from train.trainer import check_launch_environment

REPO = Path(__file__).resolve().parents[2]


def launch_env(*argv: str) -> dict[str, str]:
    """The environment ``accelerate launch ARGV script.py`` gives each process."""
    args = launch_command_parser().parse_args([*argv, "script.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml"])
def test_shipped_accelerate_configs_pass(name: str):
    env = launch_env("--config_file", str(REPO / "configs" / "accelerate" / name))
    assert env.get("ACCELERATE_USE_FSDP", "false") == ("true" if name == "fsdp2.yaml" else "false")
    check_launch_environment(env)


@pytest.mark.parametrize(("argv", "message"), [
    (["--use_fsdp", "--num_processes", "2"], "`fsdp_version: 2`"),
    (["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2"], "`fsdp_cpu_ram_efficient_loading: false`"),
])
def test_unsupported_fsdp_settings_are_refused(argv: list[str], message: str):
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        check_launch_environment(launch_env(*argv))


def test_deepspeed_is_refused_with_the_fsdp_route():
    with pytest.raises(ValueError, match="configs/accelerate/fsdp2.yaml"):
        check_launch_environment({"ACCELERATE_USE_DEEPSPEED": "true"})


def test_plain_runs_pass():
    check_launch_environment({})
