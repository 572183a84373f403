"""Where each block's AdamW moments (and, with --offload_weights, weights) are after every training step.

After a step that trained block b, block b's tensors must be on the compute device and every other
block's in host memory. This is checked three ways: the offloader's own record (state_on_device,
weights_on_device); the tensors themselves, each traced to the copy that produced it (on a CPU-only
machine the compute device and host memory are both "cpu", so offload.HOST is swapped for an
equal-typed but distinct device, cpu:0, to tell the two destinations apart); and, on CUDA, each
tensor's .device. Moving must make real copies (a new data_ptr exactly where the record changed), and
a step must change the trained block's weights and leave every other block's bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from cli_helpers import run_cli, train_args

OFFLOAD_FLAGS = {"moments": ["--offload_optimizer", "true"], "moments+weights": ["--offload_weights", "true"]}


def moments(optimizer: torch.optim.Optimizer, layers: torch.nn.Module) -> list[torch.Tensor]:
    """AdamW's per-parameter moment tensors of a block (scalar step counters are not moved)."""
    return [
        t for p in layers.parameters() for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t) and t.ndim > 0
    ]


class Tracer:
    """Follows offload.copy_to: the destination of every copy, keyed by the copy's data_ptr.

    Copies are kept alive for the whole run, so no data_ptr is reused by another tensor.
    """

    def __init__(self, monkeypatch):
        import offload

        self.host = torch.device("cpu", 0)  # host memory, told apart from the compute device even on a CPU-only machine
        assert self.host != torch.device("cpu")
        monkeypatch.setattr(offload, "HOST", self.host)
        self.destination: dict[tuple[str, int], str] = {}
        self.copies: list[torch.Tensor] = []
        real_copy = offload.copy_to

        def traced_copy(t, device):
            out = real_copy(t, device)
            self.copies.append(out)
            self.destination[out.device.type, out.data_ptr()] = "host" if device == self.host else "device"
            return out

        monkeypatch.setattr(offload, "copy_to", traced_copy)

    def where(self, t: torch.Tensor) -> str:
        """'device' or 'host': where the copy that produced t went; never copied means where Lightning put it, the
        device."""
        return self.destination.get((t.device.type, t.data_ptr()), "device")


def run_and_check_every_step(cifar_dir, capsys, monkeypatch, flags: list[str], accelerator: str = "cpu") -> list[dict]:
    """Train dblock for 12 steps, checking block residence after every step and at the test; returns one record per
    step."""
    from module import LitClassifier

    tracer = Tracer(monkeypatch)
    steps, before = [], {}

    def on_train_batch_start(self, batch, batch_idx):
        before["weights"] = [
            [p.detach().to("cpu", copy=True) for p in layers.parameters()] for layers in self.model.blocks
        ]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        offloader, optimizer, drawn = self.offloader, self.optimizers().optimizer, self.current_block
        num_blocks = len(self.model.blocks)
        want = [b == drawn for b in range(num_blocks)]
        # 1. The offloader's record.
        assert offloader.state_on_device == want, (drawn, offloader.state_on_device)
        assert offloader.weights_on_device == (want if offloader.offload_weights else [True] * num_blocks)
        ptrs = []
        for b, layers in enumerate(self.model.blocks):
            expected = "device" if want[b] else "host"
            weights = [p.data for p in layers.parameters()]
            # 2. The tensors: each produced by a copy to where the record says.
            assert all(tracer.where(t) == expected for t in moments(optimizer, layers)), (b, drawn)
            weights_expected = expected if offloader.offload_weights else "device"
            assert all(tracer.where(t) == weights_expected for t in weights), (b, drawn)
            if accelerator == "gpu":  # 3. On CUDA the tensors' own device says it too.
                kind = {"device": "cuda", "host": "cpu"}
                assert all(t.device.type == kind[expected] for t in moments(optimizer, layers)), (b, drawn)
                assert all(t.device.type == kind[weights_expected] for t in weights), (b, drawn)
                copies = [*moments(optimizer, layers), *weights]
                assert all(t.is_pinned() for t in copies if not t.is_cuda)  # async copies
            ptrs.append(([t.data_ptr() for t in moments(optimizer, layers)], [t.data_ptr() for t in weights]))
            # Only the trained block's weights changed in this step.
            changed = [not torch.equal(old, new.cpu()) for old, new in zip(before["weights"][b], weights)]
            assert any(changed) if want[b] else not any(changed), (b, drawn, changed)
        steps.append({
            "block": drawn, "state": list(offloader.state_on_device), "weights": list(offloader.weights_on_device),
            "ptrs": ptrs,
        })

    def on_test_epoch_start(self):
        real_test_start(self)
        assert self.offloader.weights_on_device == [True] * len(self.model.blocks)
        assert all(tracer.where(p.data) == "device" for p in self.model.blocks.parameters())
        if accelerator == "gpu":
            assert all(p.is_cuda for p in self.model.parameters())

    real_test_start = LitClassifier.on_test_epoch_start
    monkeypatch.setattr(LitClassifier, "on_train_batch_start", on_train_batch_start)
    monkeypatch.setattr(LitClassifier, "on_train_batch_end", on_train_batch_end)
    monkeypatch.setattr(LitClassifier, "on_test_epoch_start", on_test_epoch_start)
    args = train_args(cifar_dir, "offload", *flags, model_type="dblock", steps=4)
    args[args.index("--accelerator") + 1] = accelerator
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert len(steps) == 12 and {s["block"] for s in steps} == {0, 1, 2}, [s["block"] for s in steps]
    return steps


def assert_moves_are_real_copies(steps: list[dict], offload_weights: bool) -> None:
    """Between consecutive steps a block's tensors have new storage exactly when the record moved them."""
    moved, weights_moves = 0, 0
    for prev, cur in zip(steps, steps[1:]):
        for b, ((prev_m, prev_w), (cur_m, cur_w)) in enumerate(zip(prev["ptrs"], cur["ptrs"])):
            if len(prev_m) == len(cur_m):  # a block's moments appear on its first step
                state_moved = prev["state"][b] != cur["state"][b]
                assert all((p != c) == state_moved for p, c in zip(prev_m, cur_m)), (b, cur["block"])
                moved += state_moved and bool(cur_m)
            weights_moved = prev["weights"][b] != cur["weights"][b]
            assert weights_moved == (offload_weights and prev["state"][b] != cur["state"][b])
            weights_moves += weights_moved
            assert all((p != c) == weights_moved for p, c in zip(prev_w, cur_w)), (b, cur["block"])
    assert moved >= 3 and (weights_moves >= 3 or not offload_weights), "too few moves to test anything"


@pytest.mark.parametrize("what", sorted(OFFLOAD_FLAGS))
def test_only_the_trained_block_is_on_the_device(cifar_dir, capsys, monkeypatch, what):
    steps = run_and_check_every_step(cifar_dir, capsys, monkeypatch, OFFLOAD_FLAGS[what])
    assert_moves_are_real_copies(steps, offload_weights=what == "moments+weights")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("what", sorted(OFFLOAD_FLAGS))
def test_only_the_trained_block_is_on_the_gpu(cifar_dir, capsys, monkeypatch, what):
    steps = run_and_check_every_step(cifar_dir, capsys, monkeypatch, OFFLOAD_FLAGS[what], accelerator="gpu")
    assert_moves_are_real_copies(steps, offload_weights=what == "moments+weights")
