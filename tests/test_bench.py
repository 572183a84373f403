"""`main.py bench`: the command end to end on a tiny model, and the memory accounting checked against exact counts."""

import contextlib
import io
import json
import statistics

import pytest
import torch
from torch import nn

import bench
import main
from dblock import DiffusionBlocksViT
from tiny import dblock_config, tiny_arch, tiny_arch_flags
from vit import ViTClassifier, default_arch

ARCH_FLAGS = tiny_arch_flags()
FAST = [
    "--batch_size", "8", "--steps", "1", "--warmup_steps", "1", "--num_workers", "0", "--loader_batches", "2",
    "--accelerator", "cpu",
]
NUM_BLOCKS, NUM_LABELS = 3, 100
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(args: list[str]) -> tuple[int, str, str]:
    """main.py bench in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main.main(["bench", "cifar100", *args])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny benchmark run on CPU: (report JSON, printed table, PNG path)."""
    folder = tmp_path_factory.mktemp("bench")
    outputs = ["--output", str(folder / "b.json"), "--plot", str(folder / "b.png")]
    code, out, err = run_bench([*ARCH_FLAGS, *FAST, *outputs])
    assert code == 0, err
    return json.loads((folder / "b.json").read_text()), out, folder / "b.png"


def numel(params) -> int:
    """Number of scalars in some parameters."""
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    """Exact parameter counts of the tiny models: vit, all of dblock, and one block plus the shared stem and head."""
    arch = tiny_arch(image_size=default_arch("cifar100").image_size)  # the size bench gives cifar100
    vit = ViTClassifier(arch=arch, num_labels=NUM_LABELS)
    db = DiffusionBlocksViT(arch=arch, num_labels=NUM_LABELS, dcfg=dblock_config(num_blocks=NUM_BLOCKS))
    block = max(numel(b.parameters()) for b in db.blocks)
    return {
        "vit": numel(vit.parameters()), "all": numel(db.parameters()), "trained": block + numel(db.shared_parameters())
    }


def test_report_has_every_key_and_positive_numbers(tiny_run):
    report, _, _ = tiny_run
    for key in ("device", "method", "config", "versions", "date", "ratios", "targets", "loader_images_per_s"):
        assert key in report
    assert report["method"] == bench.CPU_METHOD
    assert report["loader_images_per_s"] > 0
    assert set(report["ratios"]) == set(report["targets"]) == {"peak_memory", "train_step", "infer_step"}
    assert all(r > 0 for r in report["ratios"].values())
    assert report["config"]["hidden_size"] == 24 and report["config"]["num_blocks"] == NUM_BLOCKS
    for name in bench.VARIANTS:
        r = report[name]
        assert r["peak_memory_bytes"] > 0 and r["train_step_s"] > 0 and r["infer_step_s"] > 0
        assert set(r["breakdown"]) == {"parameters", "gradients", "optimizer", "activations"}
        assert all(v > 0 for v in r["breakdown"].values())


def test_table_is_printed(tiny_run):
    _, out, _ = tiny_run
    assert bench.CPU_METHOD in out and "data loader:" in out
    for name in bench.VARIANTS:
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert sum(line.endswith(("PASS", "FAIL")) for line in out.splitlines()) == 3


def test_plot_is_a_png(tiny_run):
    _, _, png = tiny_run
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_vit_holds_everything(tiny_run, counts):
    parts = tiny_run[0]["vit"]["breakdown"]
    n = counts["vit"]
    assert (parts["parameters"], parts["gradients"], parts["optimizer"]) == (4 * n, 4 * n, 2 * 4 * n)


@pytest.mark.parametrize(
    ("variant", "weights", "moments"),
    [("dblock-released", "all", "all"), ("dblock", "all", "trained"), ("dblock-offload-weights", "trained", "trained")],
)
def test_dblock_accounting_follows_the_offload_policy(tiny_run, counts, variant, weights, moments):
    parts = tiny_run[0][variant]["breakdown"]
    assert parts["parameters"] == 4 * counts[weights]
    assert parts["optimizer"] == 2 * 4 * counts[moments]  # AdamW: exp_avg and exp_avg_sq, fp32
    assert parts["gradients"] == 4 * counts["trained"]  # only the drawn block and the shared parts get gradients


def test_offloading_leaves_activations_alone(tiny_run):
    report = tiny_run[0]
    activations = {report[name]["breakdown"]["activations"] for name in bench.VARIANTS if name != "vit"}
    assert len(activations) == 1
    assert activations.pop() < report["vit"]["breakdown"]["activations"]


def test_saved_tensor_counter_counts_a_linear_layers_input_only():
    layer = nn.Linear(8, 3)
    x = torch.randn(4, 8)
    with bench.SavedTensorCounter(layer.parameters()) as counter:
        layer(x).sum().backward()
    assert counter.nbytes == x.nbytes  # the weight is saved too, but it is a parameter: counted elsewhere


def test_saved_tensor_counter_counts_a_storage_once_in_full():
    a = torch.randn(10, requires_grad=True)
    with bench.SavedTensorCounter([]) as counter:
        ((a[:2] * a[:2]).sum() + (a[5:] * a[5:]).sum()).backward()
    assert counter.nbytes == 10 * 4  # four saved views of one 10-float storage


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--output", "/nonexistent-folder/b.json"], "--output"),
        (["--plot", "."], "--plot"),
        (["--steps", "0"], "--steps"),
        (["--num_workers", "-1"], "--num_workers"),
        (["--num_blocks", "4"], "--num_blocks 4"),
    ],
)
def test_bad_input_fails_in_one_line_before_measuring(args, fragment):
    code, out, err = run_bench([*ARCH_FLAGS, *FAST, *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
    assert "Traceback" not in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda_is_a_user_error():
    code, _, err = run_bench([*ARCH_FLAGS, *FAST, "--accelerator", "gpu"])
    assert code == 2 and "--accelerator gpu" in err


def test_bench_steps_the_training_module(monkeypatch):
    """Every variant is stepped through LitClassifier's own block activation and loss and the recipe's AdamW."""
    import module

    losses, optimizers = [], []
    real_loss, real_optimizer = module.LitClassifier.block_loss, module.build_optimizer

    def block_loss(self, *args):
        losses.append(self.hparams.model_type)
        return real_loss(self, *args)

    def build_optimizer(*args):
        optimizers.append(real_optimizer(*args))
        return optimizers[-1]

    monkeypatch.setattr(module.LitClassifier, "block_loss", block_loss)
    monkeypatch.setattr(module, "build_optimizer", build_optimizer)
    code, _, err = run_bench([*ARCH_FLAGS, *FAST, "--warmup_steps", "0"])
    assert code == 0, err
    assert len(optimizers) == len(bench.VARIANTS)
    assert all(o.defaults["lr"] == main_default("lr") and o.defaults["weight_decay"] == main_default("weight_decay")
               for o in optimizers)
    # vit: warmup, memory, timed and counted step; dblock: one step per block to warm up, one measured per block,
    # one timed, one counted
    assert losses.count("vit") == 4 and losses.count("dblock") == 3 * (2 * NUM_BLOCKS + 2)


def test_op_counter_counts_each_outermost_operator_once():
    x = torch.ones(4)
    with bench.OpCounter() as counter:
        y = x.to(torch.float64)  # aten::to runs aten::_to_copy, which runs empty_strided and copy_: one operator
        torch.add(y, 1.0).mul_(2.0)
    assert counter.ops == 3 and counter.graph_calls == 0


def test_bench_compile_counts_fewer_operators_than_eager(tmp_path):
    shallow = [*ARCH_FLAGS, *FAST, "--num_hidden_layers", str(NUM_BLOCKS)]  # one layer per block: compiles faster
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        code, printed, err = run_bench([*shallow, *extra, "--output", str(tmp_path / f"{name}.json")])
        assert code == 0, err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["compiled"]["config"]["compile"] is True and "compiled-graph calls per step" in printed
    for variant in bench.VARIANTS:
        eager, compiled = reports["eager"][variant], reports["compiled"][variant]
        assert compiled["train_step_s"] > 0 and compiled["compiled_graph_calls_per_step"] > 0
        assert eager["compiled_graph_calls_per_step"] == 0
        assert 0 < compiled["ops_per_step"] < eager["ops_per_step"]

def main_default(flag: str):
    """train's default of a flag."""
    from config import default_flags

    return default_flags()[flag]


def test_overhead_reports_ops_host_time_and_targets(tmp_path):
    import overhead

    out = tmp_path / "o.json"
    args = [*ARCH_FLAGS, "--overhead", "--batch_size", "8", "--steps", "1", "--warmup_steps", "0", "--accelerator",
            "cpu", "--output", str(out)]
    code, printed, err = run_bench(args)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report["sizes"]) == {"launch-bound", "configured"}
    for name, size in report["sizes"].items():
        variants = size["variants"]
        assert set(variants) == {*overhead.PROJECT, *overhead.BARE}
        assert all(v["ops_per_step"] > 0 and v["host_ms_per_step"] > 0 for v in variants.values())
        ops = size["targets"]["ops dblock / dblock-no-offload"]
        assert ops["value"] == variants["dblock"]["ops_per_step"] / variants["dblock-no-offload"]["ops_per_step"]
        assert ops["pass"] == (ops["value"] <= overhead.OPS_TARGET)
        host = size["targets"]["host vit / vit-bare"]
        project, bare = variants["vit"]["round_medians_ms"], variants["vit-bare"]["round_medians_ms"]
        assert len(project) == len(bare) == overhead.ROUNDS[name]
        assert host["value"] == statistics.median(p / b for p, b in zip(project, bare))  # paired by round
        assert host["pass"] == (host["value"] <= overhead.HOST_TARGET)
    assert report["pass"] == all(t["pass"] for s in report["sizes"].values() for t in s["targets"].values())
    assert "launch-bound" in printed and "dblock-bare" in printed and "overall:" in printed
