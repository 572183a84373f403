"""Where each block's AdamW moments (and, with --offload_weights, weights) are after every training step.

After a step that trained block b, block b's tensors must be on the compute device and every other
block's in host memory. This is checked three ways: the offloader's own record (state_on_device,
weights_on_device); the tensors themselves, each traced to the flat buffer it is a view of and to
where that buffer was allocated (on a CPU-only machine the compute device and host memory are both
"cpu", so the allocation function tells the two apart); and, on CUDA, each tensor's .device. Moving
must make real copies (a new data_ptr exactly where the record changed), and a step must change the
trained block's weights and leave every other block's bit for bit.

Then the offloader on its own, on tiny blocks: training is bit-identical with and without it (whatever
is prefetched, and after new optimizer state is loaded), a move in the steady state is one copy per
kind of tensor and nothing else, and saved state holds per-parameter tensors.
"""

from __future__ import annotations

import pytest
import torch

from cli_helpers import run_cli, train_args

OFFLOAD_FLAGS = {"moments": ["--offload_optimizer", "true"], "moments+weights": ["--offload_weights", "true"]}


def moments(optimizer: torch.optim.Optimizer, layers: torch.nn.Module) -> list[torch.Tensor]:
    """AdamW's per-parameter moment tensors of a block (scalar step counters are not moved)."""
    states = [optimizer.state.get(p, {}) for p in layers.parameters()]
    return [t for state in states for t in state.values() if torch.is_tensor(t) and t.ndim > 0]


class Tracer:
    """Follows offload.host_buffer and offload.device_buffer: where every flat buffer the offloader made lives,
    keyed by its storage's data_ptr (a tensor is a view into one of them, or was never moved).

    Buffers are kept alive for the whole run, so no data_ptr is reused by another allocation.
    """

    def __init__(self, monkeypatch):
        import offload

        self.destination: dict[tuple[str, int], str] = {}
        self.buffers: list[torch.Tensor] = []
        for name, where in (("host_buffer", "host"), ("device_buffer", "device")):
            monkeypatch.setattr(offload, name, self.traced(getattr(offload, name), where))

    def traced(self, allocate, where: str):
        def allocate_and_record(*args, **kwargs):
            buffer = allocate(*args, **kwargs)
            self.buffers.append(buffer)
            self.destination[buffer.device.type, buffer.untyped_storage().data_ptr()] = where
            return buffer

        return allocate_and_record

    def where(self, t: torch.Tensor) -> str:
        """Where the buffer t is a view of lives (device or host); never moved: where Lightning put it, the device."""
        return self.destination.get((t.device.type, t.untyped_storage().data_ptr()), "device")


def run_and_check_every_step(cifar_dir, capsys, monkeypatch, flags: list[str], accelerator: str = "cpu") -> list[dict]:
    """Train dblock for 12 steps, checking block residence after every step and at the test; one record per step."""
    from module import LitClassifier

    tracer = Tracer(monkeypatch)
    steps, before = [], {}

    def on_train_batch_start(self, batch, batch_idx):
        blocks = self.model.blocks
        before["weights"] = [[p.detach().to("cpu", copy=True) for p in layers.parameters()] for layers in blocks]

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
                host = [t for t in [*moments(optimizer, layers), *weights] if not t.is_cuda]
                assert all(t.is_pinned() for t in host)  # so that copies are asynchronous
            ptrs.append(([t.data_ptr() for t in moments(optimizer, layers)], [t.data_ptr() for t in weights]))
            # Only the trained block's weights changed in this step.
            changed = [not torch.equal(old, new.cpu()) for old, new in zip(before["weights"][b], weights)]
            assert any(changed) if want[b] else not any(changed), (b, drawn, changed)
        record = {"state": list(offloader.state_on_device), "weights": list(offloader.weights_on_device)}
        steps.append({"block": drawn, **record, "ptrs": ptrs})

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
    # The checkpoint holds per-parameter tensors, as without offloading (not views of the flat buffers).
    ckpt = torch.load("logs/offload/last.ckpt", weights_only=True)
    moments_saved = [t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values()]
    saved = [*ckpt["state_dict"].values(), *moments_saved]
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("what", sorted(OFFLOAD_FLAGS))
def test_only_the_trained_block_is_on_the_gpu(cifar_dir, capsys, monkeypatch, what):
    steps = run_and_check_every_step(cifar_dir, capsys, monkeypatch, OFFLOAD_FLAGS[what], accelerator="gpu")
    assert_moves_are_real_copies(steps, offload_weights=what == "moments+weights")


# ---- the offloader on its own: bit-identity, copies per move, saved state ------------------------------------
SEQUENCE = [0, 1, 1, 2, 0, 2, 1, 0, 0, 2, 1, 2, 1]  # repeats, returns and every pair of blocks
WARMUP = 6  # by then every block has trained and moved, so its tensors are in the offloader's flat buffers
LAYERS_PER_BLOCK = 4


def tiny_blocks() -> torch.nn.ModuleList:
    """Three blocks of LAYERS_PER_BLOCK (Linear, LayerNorm) pairs: 4 x LAYERS_PER_BLOCK parameters each."""
    from torch import nn

    torch.manual_seed(0)
    layers = [[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(LAYERS_PER_BLOCK)] for _ in range(3)]
    return nn.ModuleList(nn.Sequential(*block) for block in layers)


def next_block(step: int, prefetch: str) -> int | None:
    """The block prefetched during `step`: the true next one, a wrong one (a slot filled for nothing), or none."""
    upcoming = SEQUENCE[(step + 1) % len(SEQUENCE)]
    return {"next": upcoming, "wrong": (upcoming + 1) % 3, "none": None}[prefetch]


def halved_moments(state_dict: dict) -> dict:
    """An optimizer state dict with every moment halved: new state, which training must continue from."""
    state = {i: {k: v / 2 if v.ndim else v for k, v in s.items()} for i, s in state_dict["state"].items()}
    return {**state_dict, "state": state}


def train_blocks(offload_weights: bool | None, prefetch: str = "next", on_move=None, reload_at: int = 8):
    """Train SEQUENCE on tiny blocks (offload_weights None: no offloader); at step `reload_at` new optimizer state
    is loaded (halved moments), replacing every state tensor, as a resumed run's are. on_move(step, fn) runs the
    moves of a step."""
    from offload import BlockOffloader

    blocks = tiny_blocks()
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=1e-2, weight_decay=0.01)
    offloader = None if offload_weights is None else BlockOffloader(blocks, offload_weights=offload_weights)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for step, block in enumerate(SEQUENCE):
        if step == reload_at:
            optimizer.load_state_dict(halved_moments(optimizer.state_dict()))
        optimizer.zero_grad(set_to_none=True)

        def move(step=step, block=block):
            offloader.activate(block, optimizer, torch.device("cpu"))
            if next_block(step, prefetch) is not None:
                offloader.prefetch(next_block(step, prefetch))

        if offloader is not None:
            (on_move or (lambda s, fn: fn()))(step, move)
        blocks[block](x).square().mean().backward()
        optimizer.step()
    return blocks, optimizer, offloader


def saved_tensors(blocks, optimizer) -> list[torch.Tensor]:
    """Every weight and every AdamW tensor, in a fixed order."""
    return [*blocks.state_dict().values(), *[t for s in optimizer.state_dict()["state"].values() for t in s.values()]]


@pytest.mark.parametrize("prefetch", ["next", "wrong", "none"])
@pytest.mark.parametrize("offload_weights", [False, True], ids=["moments", "moments+weights"])
def test_offloaded_training_is_bit_identical(offload_weights, prefetch):
    reference = saved_tensors(*train_blocks(None)[:2])
    blocks, optimizer, offloader = train_blocks(offload_weights, prefetch)
    assert sum(offloader.state_on_device) == 1 and len(offloader.slots) == (1 if prefetch == "none" else 2)
    offloaded = saved_tensors(blocks, optimizer)
    assert len(offloaded) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(reference, offloaded))


class CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operations dispatched, and among them the copies."""

    def __init__(self):
        super().__init__()
        self.ops, self.copies = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.copies += func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("offload_weights", [False, True], ids=["moments", "moments+weights"])
def test_moving_a_block_is_one_copy_per_kind(offload_weights):
    kinds = 2 + offload_weights  # exp_avg, exp_avg_sq (and the weights)
    per_step = []

    def counted(step, move):
        counter = CopyCounter()
        with counter:
            move()
        if step >= WARMUP:
            per_step.append((counter.ops, counter.copies))

    blocks = train_blocks(offload_weights, on_move=counted, reload_at=len(SEQUENCE))[0]
    assert len(list(blocks[0].parameters())) == 4 * LAYERS_PER_BLOCK  # one copy per parameter would be 16 per kind
    # A step writes one block back and prefetches the next: at most one copy per kind each, nothing else.
    assert all(ops == copies <= 2 * kinds for ops, copies in per_step), per_step
    assert sum(copies for _, copies in per_step) >= kinds * len(per_step), "too few moves to test anything"


@pytest.mark.parametrize("offload_weights", [False, True], ids=["moments", "moments+weights"])
def test_saved_state_is_per_parameter(offload_weights, tmp_path):
    blocks, optimizer, _ = train_blocks(offload_weights)
    live = [t for s in optimizer.state.values() for t in s.values() if t.ndim > 0]
    assert any(t.untyped_storage().nbytes() > t.nbytes for t in live), "the live state should be views of flat buffers"
    reference = train_blocks(None)
    for name, (b, o) in (("offloaded", (blocks, optimizer)), ("reference", reference[:2])):
        torch.save({"state_dict": b.state_dict(), "optimizer": o.state_dict()}, tmp_path / f"{name}.pt")
    loaded = torch.load(tmp_path / "offloaded.pt", weights_only=True)
    tensors = [*loaded["state_dict"].values(), *[t for s in loaded["optimizer"]["state"].values() for t in s.values()]]
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)
    assert (tmp_path / "offloaded.pt").stat().st_size == (tmp_path / "reference.pt").stat().st_size
    # Saving copies out of the views; the optimizer and the module keep them.
    assert all(t.untyped_storage().nbytes() > t.nbytes for t in live)
    assert all(p.untyped_storage().nbytes() > p.nbytes for p in blocks.parameters()) == offload_weights
