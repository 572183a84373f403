"""One source for every flag: main.py's signatures hold the defaults, every config and tool derives them."""

import dataclasses
import inspect
from typing import get_args

import pytest

import main
from cli_helpers import assert_one_line_error, run_cli
from config import build_configs, default_configs, default_flags, spec_from_hparams, to_hparams
from dblock import DBlockConfig
from vit import ArchConfig

# Flags another subcommand defaults differently from train, on purpose.
OWN_DEFAULTS = {
    ("bench", "num_workers"),  # loader workers of the loader measurement only
    # test: None means "the checkpoint's value"
    ("test", "model_type"), ("test", "cfg_scale"), ("test", "raw_embedding_bridge"), ("test", "use_ema"),
}


def test_the_method_configs_default_to_the_signature_defaults():
    configs = default_configs()
    assert DBlockConfig() == configs.dblock  # num_blocks, gamma, partition and the released quirks
    assert ArchConfig() == configs.arch


@pytest.mark.parametrize("command", ["test", "bench"])
def test_a_flag_shared_with_train_has_trains_default(command):
    train, other = default_flags("train"), default_flags(command)
    shared = (set(train) & set(other)) - {name for cmd, name in OWN_DEFAULTS if cmd == command}
    assert shared, command
    assert {k: other[k] for k in shared} == {k: train[k] for k in shared}


def test_model_defaults_are_trains_defaults():
    from module import LitClassifier

    module = LitClassifier(num_labels=3)
    assert dict(module.hparams) == {**to_hparams(default_configs(), 3), "arch": ArchConfig().to_dict()}
    flags = default_flags("train")
    for name in ("lr", "weight_decay", "gamma", "seed", "partition", "cfg_scale", "augment", "offload_optimizer"):
        assert module.hparams[name] == flags[name], name
    assert module.hparams["compile_model"] == flags["compile"]


def test_hparams_round_trip_through_the_typed_configs():
    flags = {"layers_per_block": "6,4,2", "train_blocks": "0,2", "gamma": 0.1,
             "scheduler_specific_kwargs": '{"min_lr": 5e-5}', "num_inference_steps": 7}
    configs = build_configs("tiny-imagenet", flags)
    spec = spec_from_hparams(to_hparams(configs, 200))
    assert (spec.arch, spec.dblock, spec.optim, spec.sampler, spec.model) == (
        configs.arch, configs.dblock, configs.optim, configs.sampler, configs.model
    )
    assert spec.dblock.layers_per_block == (6, 4, 2) and spec.dblock.num_blocks == 3 and spec.arch.hidden_size == 768


def test_choice_lists_derive_from_the_literal_types():
    import data
    import flags
    import module

    assert data.DATASETS == get_args(flags.Data)
    assert module.MODEL_TYPES == get_args(flags.ModelType)


def test_config_fields_are_flags():
    """Every RunConfig / ModelConfig field is one of train's flags (compile_model is --compile)."""
    from config import ModelConfig, OptimConfig, RunConfig, SamplerConfig

    names = set(inspect.signature(main.train).parameters) | {"compile_model"}
    for cls in (RunConfig, ModelConfig, OptimConfig, SamplerConfig):
        assert {f.name for f in dataclasses.fields(cls)} <= names, cls.__name__


def test_an_unknown_subcommand_names_the_help_command(capsys):
    code, _, err = run_cli(["nosuch"], capsys)
    assert_one_line_error(code, err, "see `main.py --help`")
    assert "main.py main.py" not in err


def test_a_bad_flag_names_the_subcommands_help(capsys):
    code, _, err = run_cli(["train", "cifar100", "--no_such_flag", "1"], capsys)
    assert_one_line_error(code, err, "see `main.py train --help`")
