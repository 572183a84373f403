"""Block layout (--layers_per_block), noise partition (--partition), blocks.json, one block per optimizer step, the
EDM preconditioning around the backbone and the sampler's trajectory."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import dblock
import edm
from cli_helpers import assert_one_line_error, cifar_dir, run_cli, traced_training, train_args  # noqa: F401 (fixture)
from vit import ArchConfig

ARCH = ArchConfig(
    hidden_size=24, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48, patch_size=8, image_size=16
)
SPEC_RANGES = {  # SPEC section 4, block 0 first
    2: [(0.3012001, 80.0), (0.002, 0.3012001)],
    3: [(0.50504146, 80.0), (0.17963247, 0.50504146), (0.002, 0.17963247)],
    4: [(0.6766486, 80.0), (0.3012001, 0.6766486), (0.1340761, 0.3012001), (0.002, 0.1340761)],
}
SPEC_WIDENED_B3 = [(0.39205, 80.0), (0.17058, 0.53183), (0.002, 0.22493)]


def model(**dcfg) -> dblock.DiffusionBlocksViT:
    return dblock.DiffusionBlocksViT(arch=ARCH, num_labels=5, dcfg=dblock.DBlockConfig(**dcfg))


def layer_params(m) -> int:
    return sum(p.numel() for p in m.blocks[0][0].parameters())


def test_uneven_layout_builds_those_layers_with_the_same_parameter_count():
    even, uneven = model(num_blocks=3), model(num_blocks=3, layers_per_block=(3, 2, 1))
    assert [len(b) for b in uneven.blocks] == [3, 2, 1]
    per_layer = layer_params(even)
    for b, n in enumerate((3, 2, 1)):
        assert sum(p.numel() for p in uneven.blocks[b].parameters()) == n * per_layer
    assert sum(p.numel() for p in uneven.parameters()) == sum(p.numel() for p in even.parameters())


@pytest.mark.parametrize("num_blocks", sorted(SPEC_RANGES))
def test_block_table_matches_spec(num_blocks):
    layout = None if 6 % num_blocks == 0 else (1, 1, 2, 2)
    table = dblock.block_table(model(num_blocks=num_blocks, layers_per_block=layout))
    assert [row["block"] for row in table] == list(range(num_blocks))
    assert sum(len(row["layers"]) for row in table) == 6 and table[0]["layers"][0] == 0
    for row, (lo, hi) in zip(table, SPEC_RANGES[num_blocks], strict=True):
        assert row["sigma_range"] == pytest.approx([lo, hi], rel=1e-6)
        assert row["probability_mass"] == pytest.approx(1 / num_blocks, rel=1e-9)
        wlo, whi = row["widened_range"]
        assert wlo <= lo and whi >= hi
    if num_blocks == 3:
        for row, want in zip(table, SPEC_WIDENED_B3, strict=True):
            assert row["widened_range"] == pytest.approx(list(want), rel=1e-4)


# B = 3 uniform in log sigma: boundaries 0.002 * 40000**(k / 3) (computed once in float64), each range widened by
# 5% of its log width on each side; the masses are the truncated log-normal's (P_mean -1.2, P_std 1.2) inside them.
UNIFORM_B3 = [  # block 0 first: (sigma_range, widened_range, probability_mass)
    ((2.3392141905702926, 80.0), (1.9605096757579592, 80.0), 0.0438006147072558),
    ((0.06839903786706789, 2.3392141905702926), (0.0573256506785423, 2.791071677445259), 0.8478584939631074),
    ((0.002, 0.06839903786706789), (0.002, 0.0816114309347348), 0.1083408913296367),
]


def test_uniform_partition_table_is_pinned():
    table = dblock.block_table(model(num_blocks=3, partition="uniform"))
    for row, (sigma_range, widened, mass) in zip(table, UNIFORM_B3, strict=True):
        assert row["sigma_range"] == pytest.approx(list(sigma_range), rel=1e-12)
        assert row["widened_range"] == pytest.approx(list(widened), rel=1e-12)
        assert row["probability_mass"] == pytest.approx(mass, rel=1e-12)
    # Uniform in log sigma is far from equi-probable: the middle range holds most of the mass.
    assert table[1]["probability_mass"] > 0.6


@pytest.mark.parametrize("partition,visits", [("equiprob", [0, 0, 1, 2, 2]), ("uniform", [0, 1, 1, 1, 2])])
def test_inference_routing_follows_the_partition(monkeypatch, partition, visits):
    m = model(num_blocks=3, partition=partition).eval()
    seen, original = [], dblock.DiffusionBlocksViT.forward

    def spy(self, images, z, sigma, block):
        seen.append(block)
        return original(self, images, z, sigma, block)

    monkeypatch.setattr(dblock.DiffusionBlocksViT, "forward", spy)
    dblock.sample_logits(m, torch.randn(2, 3, 16, 16), 5)  # grid 80, 0.677, 0.301, 0.134, 0.002
    assert seen == visits


def perturbed(m: dblock.DiffusionBlocksViT) -> dblock.DiffusionBlocksViT:
    """The model moved off its zero init (adaLN-Zero), so that F_x and the logits depend on every input."""
    g = torch.Generator().manual_seed(1)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_denoiser_is_c_skip_z_plus_c_out_F_x():
    m = perturbed(model(num_blocks=3)).eval()
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 24, generator=g)
    sigma = torch.tensor([0.5, 2.0])
    # EDM scalings at sigma_data 0.5 by hand (tests/test_edm.py): (c_skip, c_out, c_in) at 0.5 and at 2.
    c_skip, c_out = torch.tensor([0.5, 1 / 17]), torch.tensor([0.25 / math.sqrt(0.5), 2 / math.sqrt(17)])
    c_in = torch.tensor([math.sqrt(2.0), 2 / math.sqrt(17)])
    with torch.no_grad():
        D_x, logits = m.denoise_and_classify(x, z, sigma, 1)
        F_x, cond = m.backbone(x, c_in[:, None] * z, torch.log(sigma) / 4, 1)
        assert torch.allclose(D_x, c_skip[:, None] * z + c_out[:, None] * F_x, atol=1e-6)
        assert torch.equal(logits, m.head(D_x, cond)) and torch.equal(logits, m(x, z, sigma, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.denoise_and_classify(x, z, sigma, 1)[0].dtype == torch.float32  # the scalings stay in fp32


def test_assembled_blocks_denoise_with_the_member_that_trained_the_block():
    members = [dblock.DiffusionBlocksViT(arch=ARCH, num_labels=5, built_blocks=b, label_seed=4) for b in ((0,), (1, 2))]
    assembled = dblock.AssembledBlocks([perturbed(m).eval() for m in members])
    x, z, sigma = torch.randn(2, 3, 16, 16), torch.randn(2, 24), torch.full((2,), 0.3)
    with torch.no_grad():
        D_x, logits = assembled.denoise_and_classify(x, z, sigma, 1)
        want_D_x, want_logits = members[1].denoise_and_classify(x, z, sigma, 1)
        assert torch.equal(D_x, want_D_x) and torch.equal(logits, want_logits)
        assert torch.equal(assembled(x, z, sigma, 1), want_logits)
        D_x0 = assembled.denoise_and_classify(x, z, sigma, 0)[0]
        assert torch.equal(D_x0, members[0].denoise_and_classify(x, z, sigma, 0)[0])


def test_sampler_trajectory_ends_in_the_sampled_logits():
    m = perturbed(model(num_blocks=3)).eval()
    x = torch.randn(3, 3, 16, 16)
    steps = list(dblock.sampler_steps(m, x, 5, 1.5, generator=torch.Generator().manual_seed(7)))
    assert [s.index for s in steps] == list(range(5))
    assert [s.sigma for s in steps] == dblock.sampler_grid(5, m.edm_cfg)
    assert [s.block for s in steps] == [0, 0, 1, 2, 2]  # as test_inference_routing_follows_the_partition
    assert torch.equal(steps[-1].logits, dblock.sample_logits(m, x, 5, 1.5, generator=torch.Generator().manual_seed(7)))
    # Each state is the Euler step from the previous one toward its bridge estimate softmax(logits) @ table.
    for before, after in itertools.pairwise(steps):
        assert torch.equal(after.z, edm.euler_step(before.z, before.denoised, before.sigma, after.sigma))
    assert torch.allclose(steps[2].denoised, steps[2].logits.softmax(dim=-1) @ m.label_embed.weight)
    assert all(not torch.equal(a.logits, b.logits) for a, b in itertools.pairwise(steps))


def test_training_sigmas_follow_the_partition():
    m = model(num_blocks=3, partition="uniform")
    g = torch.Generator().manual_seed(0)
    for block in range(3):
        lo, hi = m.training_range(block)
        sigma = dblock.block_losses(m, torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,)), block, generator=g)[2]
        assert lo <= sigma.min().item() and sigma.max().item() <= hi
        assert (lo, hi) == edm.widened_block_range(block, edm.uniform_boundaries(3), 0.05)


def test_training_reduces_the_per_sample_losses_as_the_flag_says(cifar_dir, capsys, monkeypatch):
    """--batch_mean_loss_weight false reaches the reduction: training uses the paper's mean(CE * w)."""
    real, flags = dblock.reduce_loss, []

    def spy(ce, w, batch_mean_loss_weight):
        flags.append(batch_mean_loss_weight)
        return real(ce, w, batch_mean_loss_weight)

    monkeypatch.setattr(dblock, "reduce_loss", spy)
    args = train_args(cifar_dir, "paper", "--batch_mean_loss_weight", "false", model_type="dblock", steps=2)
    assert run_cli(args, capsys)[0] == 0
    assert flags and not any(flags), flags


def test_cli_writes_blocks_json_and_checkpoint_records_the_layout(cifar_dir, capsys):
    args = train_args(cifar_dir, "uneven", "--layers_per_block", "3,2,1", "--partition", "uniform", model_type="dblock")
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    table = json.loads(Path("logs/uneven/blocks.json").read_text())["blocks"]
    assert [row["layers"] for row in table] == [[0, 1, 2], [3, 4], [5]]
    assert table == dblock.block_table(model(num_blocks=3, layers_per_block=(3, 2, 1), partition="uniform"))
    assert "block 0: layers 0-2" in out and "block 2: layers 5-5" in out
    hparams = torch.load("logs/uneven/last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["layers_per_block"] == [3, 2, 1] and hparams["partition"] == "uniform" and hparams["num_blocks"] == 3
    # test and resume read the layout back from the checkpoint.
    code, _, err = run_cli(["test", "cifar100", "--ckpt_path", "logs/uneven/last.ckpt", "--data_dir", cifar_dir,
                            "--num_workers", "0", "--accelerator", "cpu"], capsys)
    assert code == 0, err
    code, _, err = run_cli(train_args(cifar_dir, "x", "--ckpt_path", "logs/uneven/last.ckpt",
                                      "--layers_per_block", "3,2,1",
                                      "--partition", "uniform", model_type="dblock", steps=3), capsys)
    assert code == 0, err
    assert torch.load("logs/uneven/last.ckpt", weights_only=True)["global_step"] == 9
    args = train_args(cifar_dir, "x", "--ckpt_path", "logs/uneven/last.ckpt", model_type="dblock", steps=4)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "layers_per_block=[3, 2, 1]", "layers_per_block=None")


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--layers_per_block", "3,2"], "must be positive numbers summing to --num_hidden_layers 6"),
        (["--layers_per_block", "4,-1,3"], "must be positive numbers"),
        (["--layers_per_block", "3,x,1"], "comma-separated integers"),
        (["--layers_per_block", "2,2,2", "--num_blocks", "2"],
         "--num_blocks 2 disagrees with --layers_per_block 2,2,2"),
        (["--partition", "linear"], "partition"),
    ],
)
def test_bad_layouts_are_one_line_errors(cifar_dir, capsys, flags, fragment):
    code, _, err = run_cli(train_args(cifar_dir, "bad", *flags, model_type="dblock"), capsys)
    assert_one_line_error(code, err, fragment)
    assert not Path("logs/bad").exists()


def test_accumulation_trains_one_block_per_optimizer_step(cifar_dir, capsys, monkeypatch, tmp_path):
    args = train_args(cifar_dir, "acc", "--accumulate_grad_batches", "2", model_type="dblock", steps=2)
    records = traced_training(args, tmp_path / "trace", monkeypatch, capsys)
    assert [r["step"] for r in records] == list(range(6))
    # Both micro-batches of a step trained the drawn block and no other (released: one block per micro-batch).
    assert all(r["blocks_with_grad"] == [r["block"]] for r in records)
    assert len({r["block"] for r in records}) > 1
