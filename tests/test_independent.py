"""Blocks trained as separate jobs (--train_blocks), assembled (main.py assemble) and tested.

The Slurm array script runs for real: fake `srun` and `uv` execute its commands with this
interpreter, under the simulated Slurm variables of the cluster tests, one process per block, all at
once, sharing nothing but the files they write.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dblock
from cli_helpers import FAST, TINY_ARCH, assert_one_line_error, read_metrics, run_cli, traced_training, train_args

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "configs" / "slurm"
ARRAY_JOB = "77"


def fake_cluster_tools(folder: Path) -> Path:
    """`srun` runs its command; `uv sync` does nothing and `uv run [--flags] main.py ...` runs main.py with this
    Python."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (folder / "uv").write_text(
        '#!/bin/sh\n[ "$1" = sync ] && exit 0\nshift\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def slurm_env(bin_dir: Path, cwd: Path, task: int | None = None) -> dict:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(cwd),
           "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": str(100 + (task or 0)), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NTASKS": "1"}
    if task is not None:
        env.update(SLURM_ARRAY_JOB_ID=ARRAY_JOB, SLURM_ARRAY_TASK_ID=str(task))
    return env


@pytest.fixture(scope="module")
def array_run(tmp_path_factory):
    """The three block jobs of blocks-array.sbatch (run concurrently), then blocks-assemble.sbatch."""
    from synthetic import write_cifar

    root = tmp_path_factory.mktemp("array")
    data = write_cifar(root / "data", "cifar100", n_train=32, n_test=12)
    tools = fake_cluster_tools(root / "bin")
    flags = ["--data_dir", str(data), "--max_steps", "2", *TINY_ARCH, *FAST]
    # The repository's main.py runs inside the scripts; they cd to SLURM_SUBMIT_DIR, so give them a copy of it.
    work = root / "work"
    work.mkdir()
    for name in os.listdir(REPO):
        if name.endswith(".py"):
            os.symlink(REPO / name, work / name)
    jobs = [
        subprocess.Popen(["bash", str(SLURM / "blocks-array.sbatch"), *flags], cwd=work,
                         env=slurm_env(tools, work, task), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for task in range(3)
    ]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, out in zip(jobs, outputs):
        assert job.returncode == 0, out[-3000:]
    test_flags = ["--data_dir", str(data), "--num_workers", "0", "--accelerator", "cpu", "--batch_size", "8"]
    assembled = subprocess.run(["bash", str(SLURM / "blocks-assemble.sbatch"), ARRAY_JOB, *test_flags], cwd=work,
                               env=slurm_env(tools, work), capture_output=True, text=True, timeout=600)
    assert assembled.returncode == 0, assembled.stdout[-3000:] + assembled.stderr[-3000:]
    return {"work": work, "tools": tools, "flags": flags, "outputs": outputs}


def job_ckpt(work: Path, block: int) -> dict:
    return torch.load(work / "logs" / f"blocks-{ARRAY_JOB}-b{block}" / "last.ckpt", weights_only=True)


def test_each_job_holds_only_its_block_and_the_seeded_label_table(array_run):
    tables = []
    for block in range(3):
        ckpt = job_ckpt(array_run["work"], block)
        assert ckpt["hyper_parameters"]["train_blocks"] == [block]
        layer_keys = {k.split(".")[2] for k in ckpt["state_dict"] if k.startswith("model.blocks.")}
        assert layer_keys == {str(block)}  # the other blocks' layers never existed in that process
        assert ckpt["global_step"] == 2  # --max_steps x the one block it trains
        tables.append(ckpt["state_dict"]["model.label_embed.weight"])
    want = dblock.seeded_label_table(100, 24, seed=42, std=0.02)
    assert all(torch.equal(t, want) for t in tables)  # frozen: agreed without communicating, untouched by training
    assert "trained blocks [0] of 3" in array_run["outputs"][0]


def test_assembled_model_is_tested_and_holds_each_jobs_weights(array_run):
    work = array_run["work"]
    out = work / "logs" / f"blocks-{ARRAY_JOB}"
    metrics = read_metrics(out / "metrics.json")
    assert metrics["num_test_images"] == 12 and metrics["ckpt_path"].endswith("model.ckpt")
    assembled = torch.load(out / "model.ckpt", weights_only=True)
    assert assembled["hyper_parameters"]["member_blocks"] == [[0], [1], [2]]
    # The jobs' flags, all blocks trained: report describes the assembled model like a joint run.
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train_blocks"] is None and config["model_type"] == "dblock" and config["max_steps"] == 2
    for block in range(3):
        for key, value in job_ckpt(work, block)["state_dict"].items():
            assert torch.equal(assembled["state_dict"][key.replace("model.", f"model.members.{block}.", 1)], value)


def test_requeued_array_task_resumes_in_its_folder(array_run):
    work, tools = array_run["work"], array_run["tools"]
    flags = [*array_run["flags"]]
    flags[flags.index("--max_steps") + 1] = "3"
    proc = subprocess.run(["bash", str(SLURM / "blocks-array.sbatch"), *flags], cwd=work, env=slurm_env(tools, work, 1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from logs/blocks-{ARRAY_JOB}-b1/last.ckpt" in proc.stdout
    assert job_ckpt(work, 1)["global_step"] == 3


def test_a_job_draws_its_steps_only_among_its_blocks(cifar_dir, capsys, monkeypatch, tmp_path):
    args = train_args(cifar_dir, "j02", "--train_blocks", "0,2", model_type="dblock", steps=4)
    records = traced_training(args, tmp_path / "trace", monkeypatch, capsys)
    assert len(records) == 8 and {r["block"] for r in records} == {0, 2}  # 4 steps x 2 blocks, both drawn
    assert all(r["blocks_with_grad"] == [r["block"]] for r in records)
    assert not Path("logs/j02/metrics.json").exists()  # it cannot sample alone: nothing pretends to be a test


def test_assemble_errors_are_one_line(cifar_dir, capsys):
    runs = {"b0": ["--train_blocks", "0"], "b1": ["--train_blocks", "1"],
            "b2s7": ["--train_blocks", "2", "--seed", "7"],
            "uneven": ["--train_blocks", "2", "--layers_per_block", "2,3,1"], "joint": []}
    for name, extra in runs.items():
        assert run_cli(train_args(cifar_dir, name, *extra, model_type="dblock", steps=1), capsys)[0] == 0
    ckpt = {name: f"logs/{name}/last.ckpt" for name in runs}
    cases = [
        ([ckpt["b0"], ckpt["b1"]], "no checkpoint trains block(s) 2 of 3"),
        ([ckpt["b0"], ckpt["b0"], ckpt["b1"]], "block 0 is trained by both"),
        ([ckpt["b0"], ckpt["b1"], ckpt["b2s7"]], "has seed=7 but"),
        ([ckpt["b0"], ckpt["b1"], ckpt["uneven"]], "layers_per_block=[2, 3, 1]"),
        ([ckpt["b0"], ckpt["joint"]], "is not an independent block job"),
        ([ckpt["b0"], "logs/nothing.ckpt"], "does not exist"),
    ]
    for paths, fragment in cases:
        code, _, err = run_cli(["assemble", *paths, "--output", "logs/out.ckpt"], capsys)
        assert_one_line_error(code, err, fragment)
        assert not Path("logs/out.ckpt").exists()


@pytest.mark.parametrize(
    "flags,fragment", [(["--train_blocks", "3"], "between 0 and 2"), (["--train_blocks", "1,1"], "distinct")]
)
def test_bad_train_blocks_are_one_line_errors(cifar_dir, capsys, flags, fragment):
    code, _, err = run_cli(train_args(cifar_dir, "bad", *flags, model_type="dblock"), capsys)
    assert_one_line_error(code, err, fragment)
    assert not Path("logs/bad").exists()


def test_joint_mode_keeps_a_trainable_shared_label_table():
    from tiny import dblock_config, tiny_arch

    arch, dcfg = tiny_arch(), dblock_config()
    joint = dblock.DiffusionBlocksViT(arch=arch, num_labels=5, dcfg=dcfg)
    job = dblock.DiffusionBlocksViT(arch=arch, num_labels=5, dcfg=dcfg, built_blocks=(1,), label_seed=42)
    assert joint.label_embed.weight.requires_grad and not job.label_embed.weight.requires_grad
    assert [len(b) for b in joint.blocks] == [2, 2, 2] and [len(b) for b in job.blocks] == [0, 2, 0]
    per_layer = sum(p.numel() for p in joint.blocks[0][0].parameters())
    assert sum(p.numel() for p in joint.parameters()) - sum(p.numel() for p in job.parameters()) == 4 * per_layer
