"""--compile on a CPU (inductor's C++ backend): the compiled training step computes what the eager one does, each
dblock block is one graph that is compiled once (`bench --compile` is tested in test_bench.py).

Dropout is off in these models: inductor draws its own dropout masks, so with dropout the two runs would differ by
construction. Tolerance: fused kernels reorder fp32 sums, so losses agree to 1e-5 (relative) and weights after the
steps to 2e-5 (absolute); measured differences are about 1e-7 and 4e-6.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import bench
from cli_helpers import run_cli, train_args
from config import default_configs
from tiny import tiny_arch

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-5
NUM_BLOCKS, STEPS, NUM_LABELS = 3, 7, 10


def tiny_configs(compile_model: bool):
    """A dropout-free tiny model, one layer per block, batch 4."""
    c = default_configs()
    arch = tiny_arch(num_hidden_layers=NUM_BLOCKS, hidden_size=16, intermediate_size=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return dataclasses.replace(
        c, arch=arch, model=dataclasses.replace(c.model, compile_model=compile_model),
        run=dataclasses.replace(c.run, batch_size=4), dblock=dataclasses.replace(c.dblock, num_blocks=NUM_BLOCKS),
    )


def train_steps(model_type: str, compile_model: bool) -> dict:
    """STEPS training steps of the module train builds (bench's step: its block loss, backward, clipping, AdamW):
    each step's block, loss and dynamo's graph count after it, and the weights at the end."""
    configs = tiny_configs(compile_model)
    bench.fresh_compile_cache(configs)
    counters.clear()
    v = bench.build_variant(model_type, configs, NUM_LABELS, torch.device("cpu"))
    batch = bench.random_batch(configs, NUM_LABELS, torch.device("cpu"))
    record = {"blocks": [], "losses": [], "graphs": []}
    block_loss = v.module.block_loss

    def recorded_block_loss(images, labels, where, block):
        record["blocks"].append(block)
        out = block_loss(images, labels, where, block)
        record["losses"].append(out.loss.item())
        return out

    v.module.block_loss = recorded_block_loss
    for step in range(STEPS):
        bench.step_and_clear(v, batch, step, bench.drawn_block(v, step))
        record["graphs"].append(counters["stats"]["unique_graphs"])
    record["weights"] = torch.cat([p.detach().flatten() for p in v.model.parameters()])
    record["graph_breaks"] = sum(counters["graph_break"].values())
    return record


@pytest.fixture(scope="module", params=["vit", "dblock"])
def eager_and_compiled(request):
    return request.param, train_steps(request.param, False), train_steps(request.param, True)


def test_compiled_steps_compute_the_eager_losses_and_weights(eager_and_compiled):
    _, eager, compiled = eager_and_compiled
    assert compiled["blocks"] == eager["blocks"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=LOSS_RTOL)
    torch.testing.assert_close(compiled["weights"], eager["weights"], atol=WEIGHT_ATOL, rtol=0)
    assert eager["graphs"] == [0] * STEPS  # the eager run compiled nothing: the comparison is eager against compiled


def test_each_block_is_one_graph_compiled_once(eager_and_compiled):
    model_type, _, compiled = eager_and_compiled
    blocks = compiled["blocks"]
    if model_type == "dblock":
        assert set(blocks) == set(range(NUM_BLOCKS)) and len(set(blocks[:-2])) == NUM_BLOCKS  # all, then repeats
    first_seen = [len(set(blocks[: i + 1])) for i in range(STEPS)]  # distinct blocks run so far (vit: one, None)
    assert compiled["graphs"] == first_seen  # a new graph only for a new block, never a recompile after
    assert compiled["graph_breaks"] == 0




def test_train_compile_compiles_every_graph_train_makes(cifar_dir, capsys):
    """train --compile with validation: per block a training graph, and for scoring one per batch size (the test
    split's last batch is smaller), 9 graphs for B = 3, past dynamo's default limit of 8, beyond which it would run
    the rest eagerly."""
    torch._dynamo.reset()
    counters.clear()
    args = train_args(cifar_dir, "compiled", "--compile", "--num_blocks", str(NUM_BLOCKS), "--num_hidden_layers",
                      str(NUM_BLOCKS), model_type="dblock")
    steps_flag = args.index("--max_steps")
    del args[steps_flag:steps_flag + 2]
    # 32 training images in steps of 10 (the last 2 dropped), 12 test images: batches of 10 and 2.
    code, _, err = run_cli([*args, "--num_epochs", "1", "--eval_every_n_epochs", "1", "--batch_size", "10"], capsys)
    assert code == 0, err
    assert counters["stats"]["unique_graphs"] == 3 * NUM_BLOCKS
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 3 * NUM_BLOCKS
