"""One source for every flag: main.py's signatures hold the defaults, every config and tool derives them."""

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import get_args

import pytest

import main
from cli_helpers import assert_one_line_error, run_cli
from config import build_configs, default_configs, default_flags, spec_from_hparams, to_hparams
from dblock import RELEASED_NUM_BLOCKS, DBlockConfig
from vit import ArchConfig

REPO = Path(__file__).resolve().parent.parent

# Flags another subcommand defaults differently from train, on purpose.
OWN_DEFAULTS = {
    ("bench", "num_workers"),  # loader workers of the loader measurement only
    # test: None means "the checkpoint's value"
    ("test", "model_type"), ("test", "cfg_scale"), ("test", "raw_embedding_bridge"), ("test", "use_ema"),
}


def test_the_method_configs_default_to_the_signature_defaults():
    """DBlockConfig has no defaults to drift from train's flags; the default configs are those flags."""
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(DBlockConfig))
    configs, flags = default_configs(), default_flags("train")
    d = configs.dblock
    assert (d.gamma, d.partition, d.batch_mean_loss_weight, d.raw_embedding_bridge) == (
        flags["gamma"], flags["partition"], flags["batch_mean_loss_weight"], flags["raw_embedding_bridge"]
    )
    assert flags["num_blocks"] is None and flags["layers_per_block"] is None
    assert (d.num_blocks, d.layers_per_block) == (RELEASED_NUM_BLOCKS, None) and RELEASED_NUM_BLOCKS == 3
    assert (d.gamma, d.partition) == (0.05, "equiprob")  # the released values (SPEC), pinned
    assert ArchConfig() == configs.arch


# Parameters and fields named like a flag that keep a literal default of their own, and why that is no second copy.
OWN_LITERAL_DEFAULTS = {
    # The paper's CIFAR architecture: the one copy; the flags default to None (the dataset's architecture).
    **{("vit.py", "ArchConfig", name): "per-dataset" for name in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size"
    )},
    # The method's neutral values (no image dropout, no guidance) for callers that are not a run.
    ("dblock.py", "block_losses", "class_dropout_prob"): "neutral",
    ("dblock.py", "sampler_steps", "cfg_scale"): "neutral",
    ("module.py", "Scoring", "save_predictions"): "neutral",
    # Left to do: diagnose.py and many tests build the data module from these (run.make_datamodule passes all).
    **{("data.py", "__init__", name): "to do" for name in (
        "data_dir", "batch_size", "num_workers", "add_rand_aug", "seed", "augment"
    )},
}


def literal_defaults(tree: ast.AST):
    """(owner, name, line) of every parameter or dataclass field with a literal (not None) default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            positional = a.posonlyargs + a.args
            with_default = positional[len(positional) - len(a.defaults):]
            pairs = [*zip(with_default, a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]
            named = [(arg.arg, default) for arg, default in pairs if default is not None]
        elif isinstance(node, ast.ClassDef):
            named = [(s.target.id, s.value) for s in node.body
                     if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None]
        else:
            continue
        for name, default in named:
            if isinstance(default, ast.Constant) and default.value is not None:
                yield node.name, name, default.lineno


def test_no_flag_default_is_typed_outside_main():
    """A parameter named like a flag, outside main.py and the tests, takes its value from the caller (the configs)."""
    flags = {name for command in ("train", "test", "bench") for name in default_flags(command)}
    sources = [p for p in REPO.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(REPO).parts)]
    found = set()
    for path in sources:
        if path.name == "main.py":
            continue
        rel = path.relative_to(REPO).as_posix()
        for owner, name, line in literal_defaults(ast.parse(path.read_text())):
            if name in flags and (rel, owner, name) not in OWN_LITERAL_DEFAULTS:
                found.add(f"{rel}:{line} {owner}({name}=...)")
    assert not found, sorted(found)


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
