"""`main.py assemble`: combine the checkpoints of independent block jobs into one testable checkpoint.

Each job (`train --train_blocks ...`) holds its blocks' layers, its own stem and head, and the frozen
label table derived from the seed. The assembled checkpoint keeps each job's weights as one member
of `dblock.AssembledBlocks`; `test` rebuilds it from the `member_blocks` hyper-parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from errors import UserError
from fileio import read_mapping, write_atomic, write_yaml_atomic

# Hyper-parameters every job of one model must share: they fix the network, the noise ranges and the label table.
MUST_AGREE = (
    "arch", "num_labels", "num_blocks", "layers_per_block", "partition", "gamma", "seed", "batch_mean_loss_weight",
    "raw_embedding_bridge",
)


def read_job(path: str) -> dict:
    """An independent job's checkpoint, or a one-line error saying why it is not one."""
    from experiment import read_checkpoint

    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    if hparams["model_type"] != "dblock" or not hparams.get("train_blocks"):
        raise UserError(
            f"checkpoint {path} is not an independent block job: "
            "assemble checkpoints of `train --model_type dblock --train_blocks B`"
        )
    return ckpt


def check_compatible(paths: list[str], ckpts: list[dict]) -> None:
    """Every job must share the architecture, block layout, noise partition, seed and class count."""
    first = ckpts[0]["hyper_parameters"]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        hparams = ckpt["hyper_parameters"]
        for key in MUST_AGREE:
            if hparams.get(key) != first.get(key):
                raise UserError(
                    f"checkpoint {path} has {key}={hparams.get(key)} but {paths[0]} has {key}={first.get(key)}: "
                    "assemble jobs of the same run configuration"
                )


def check_coverage(paths: list[str], ckpts: list[dict]) -> list[list[int]]:
    """The blocks of each job; every block must be trained by exactly one job."""
    owner: dict[int, str] = {}
    members = []
    for path, ckpt in zip(paths, ckpts):
        blocks = list(ckpt["hyper_parameters"]["train_blocks"])
        for b in blocks:
            if b in owner:
                raise UserError(f"block {b} is trained by both {owner[b]} and {path}: pass one checkpoint per block")
            owner[b] = path
        members.append(blocks)
    num_blocks = ckpts[0]["hyper_parameters"]["num_blocks"]
    missing = [b for b in range(num_blocks) if b not in owner]
    if missing:
        raise UserError(
            f"no checkpoint trains block(s) {', '.join(map(str, missing))} of {num_blocks}: add their jobs' checkpoints"
        )
    return members


def assembled_checkpoint(ckpts: list[dict], members: list[list[int]]) -> dict:
    """One checkpoint holding each job's weights as member i of the assembled model."""
    state = {}
    for i, ckpt in enumerate(ckpts):
        for key, value in ckpt["state_dict"].items():
            state[f"model.members.{i}.{key.removeprefix('model.')}"] = value
    hparams = {**ckpts[0]["hyper_parameters"], "train_blocks": None, "member_blocks": members}
    # Optimizer steps of all jobs together, so run reports count the assembled model's training.
    steps = sum(int(c.get("global_step", 0)) for c in ckpts)
    return {"state_dict": state, "hyper_parameters": hparams, "global_step": steps}


def assembled_config(first_job: str, target: Path) -> dict | None:
    """config.yaml beside the assembled checkpoint: the first job's flags with every block trained, so `report`
    describes the assembled model like a joint run (None when the job's run folder has none)."""
    source = Path(first_job).parent / "config.yaml"
    if not source.is_file():
        return None
    config = read_mapping(source, "restore it, or move it out of the job's folder to assemble without it")
    return {**config, "train_blocks": None, "run_name": target.parent.name, "ckpt_path": None}


def assemble(ckpt_paths: list[str], *, output: str) -> dict:
    """Combine the checkpoints of independent block jobs (train --train_blocks) into one checkpoint that `test`
    scores.

    Args:
        ckpt_paths: Checkpoints of jobs that together train every block exactly once (e.g. each job's last.ckpt).
        output: File to write the assembled checkpoint to (its folder receives test's metrics.json).
    """
    if not ckpt_paths:
        raise UserError(
            "give the checkpoints of the block jobs: main.py assemble JOB0.ckpt JOB1.ckpt ... --output FILE"
        )
    target = Path(output)
    if not target.parent.is_dir():
        raise UserError(
            f"--output {output}: folder {target.parent} does not exist: create it or choose another path"
        )
    ckpts = [read_job(path) for path in ckpt_paths]
    check_compatible(ckpt_paths, ckpts)
    members = check_coverage(ckpt_paths, ckpts)
    assembled = assembled_checkpoint(ckpts, members)
    config = assembled_config(ckpt_paths[0], target)  # read before anything is written: bad input leaves nothing
    write_atomic(target, lambda f: torch.save(assembled, f))
    if config is not None:
        write_yaml_atomic(target.parent / "config.yaml", config)
    print(f"assembled {len(members)} jobs covering blocks {sorted(b for m in members for b in m)} into {output}")
    return {"output": str(target), "member_blocks": members}
