"""Keep the blocks that are not being trained off the accelerator, at the cost of a few copies per step.

The released program keeps every block's weights and AdamW moments on the GPU, so only activations
shrink by B. Here only the trained block's moments (and, with --offload_weights, its weights) are on the
compute device; every other block's are in host memory. Tensors are copied, never recomputed, so
training is bit-identical with and without offloading.

Layout: each kind of a block's tensors (one per AdamW moment, exp_avg and exp_avg_sq, and the weights)
is one flat buffer, and the tensors the optimizer and the module hold are views into it, so moving a
block is one copy per kind, not one per parameter. Each block owns a flat buffer in (pinned) host memory;
on the device there are at most two slots, flat buffers as large as the largest block: the trained
block's and the next one's, prefetched while the current step computes. The views into every buffer are
made once and reused, so installing them dispatches nothing. On CUDA the copies run on a side stream:
each batch of copies waits for the work the compute stream has queued so far (the previous step's update
included), and the compute stream waits, by an event, only for the copies whose data it is about to use,
so the previous block's write-back overlaps the next step. On a CPU the same logic runs with the copies
done in place.

Tensors the optimizer creates (a block's first step) or loads (a resumed run) are gathered into the flat
buffers the first time they move: the only moment a move copies one tensor at a time. Saved state dicts
(the optimizer's, and the weights with --offload_weights) hold per-parameter tensors, as without offloading.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

HOST = torch.device("cpu")
WEIGHTS = "weights"  # the kind of a block's parameters; every other kind is an AdamW state key (exp_avg, exp_avg_sq)
ALIGNMENT_BYTES = 128  # every view starts on this boundary, so multi-tensor kernels keep their vectorised loads
MAX_SLOTS = 2  # device slots: the trained block and the prefetched next one


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """Flat host memory for one kind of one block: pinned beside a GPU, so copies to and from it run asynchronously."""
    return torch.empty(nbytes, dtype=torch.uint8, device=HOST, pin_memory=pinned)


def device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """Flat device memory: a slot, or the weights of a block brought back for scoring."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def copy_to(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Every move of data: asynchronous between pinned host memory and a GPU, in place on a CPU."""
    destination.copy_(source, non_blocking=True)


def padded_nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    """Bytes a tensor takes in a flat buffer, rounded up so that the next view stays aligned."""
    nbytes = shape.numel() * dtype.itemsize
    return -(-nbytes // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


def layout_nbytes(shapes: list[torch.Size], dtype: torch.dtype) -> int:
    """Bytes a flat buffer holding tensors of these shapes needs."""
    return sum(padded_nbytes(shape, dtype) for shape in shapes)


class Flat:
    """A flat buffer and the views into it, one per tensor of a block's kind; `buffer` covers exactly the views."""

    def __init__(self, storage: torch.Tensor, shapes: list[torch.Size], dtype: torch.dtype):
        self.shapes, self.dtype = shapes, dtype
        nbytes = layout_nbytes(shapes, dtype)
        if nbytes > storage.numel():
            raise RuntimeError(f"{nbytes} bytes of tensors do not fit a flat buffer of {storage.numel()}")
        self.buffer = storage[:nbytes].view(dtype)
        self.views, offset = [], 0
        for shape in shapes:
            start = offset // dtype.itemsize
            self.views.append(self.buffer[start : start + shape.numel()].view(shape))
            offset += padded_nbytes(shape, dtype)
        self.ptrs = [v.data_ptr() for v in self.views]

    def fits(self, shapes: list[torch.Size], dtype: torch.dtype) -> bool:
        return self.dtype == dtype and self.shapes == shapes


class SideStream:
    """Where moves run: a CUDA side stream ordered against the compute stream by events; on a CPU, in place."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.cuda else None
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    @contextlib.contextmanager
    def after_compute(self) -> Iterator[None]:
        """Queue the copies made in the body after everything queued on the compute stream so far."""
        if not self.cuda:
            yield
            return
        self.stream.wait_stream(self.compute)
        with torch.cuda.stream(self.stream):
            yield

    def mark(self) -> torch.cuda.Event | None:
        """An event the compute stream can wait for: the copies queued so far have landed."""
        return self.stream.record_event() if self.cuda else None

    def compute_waits(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.compute.wait_event(event)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """Device memory from the compute stream's pool, kept from reuse until the side stream is done with it."""
        if not self.cuda:
            return device_buffer(nbytes, self.device)
        with torch.cuda.stream(self.compute):
            buffer = device_buffer(nbytes, self.device)
        buffer.record_stream(self.stream)
        return buffer

    def release(self, tensors: list[torch.Tensor]) -> None:
        """Tensors read by side-stream copies and then dropped: their memory waits for those copies."""
        if self.cuda:
            for t in tensors:
                if t.is_cuda:
                    t.record_stream(self.stream)

    def synchronize(self) -> None:
        """Wait until every queued copy has landed (before host memory is read directly)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def compact(value):
    """A tensor that is a view into a larger buffer, as a tensor of its own (what a checkpoint should hold)."""
    is_view = torch.is_tensor(value) and value.untyped_storage().nbytes() > value.nbytes
    if is_view and not isinstance(value, nn.Parameter):  # state_dict(keep_vars=True) asks for the parameters themselves
        return value.detach().clone()
    return value


class BlockOffloader:
    """Moves per-block AdamW moments (and optionally weights) between the compute device and host memory.

    `activate(block, ...)` before a step makes `block` resident and sends every other block to host memory;
    `prefetch(block)` starts copying the block of the next step into a free slot. Where each block lives
    is recorded explicitly (state_on_device, weights_on_device) rather than read off tensor devices, so the
    same code path (real copies) runs on a CPU-only machine, where tests check that it changes nothing.
    """

    def __init__(self, blocks: nn.ModuleList, *, offload_weights: bool):
        self.blocks = blocks
        self.offload_weights = offload_weights
        # Lightning puts the whole model (and any restored optimizer state) on the device first.
        self.state_on_device = [True] * len(blocks)
        self.weights_on_device = [True] * len(blocks)
        self.params = [list(layers.parameters()) for layers in blocks]
        self.at: list[dict[str, Flat]] = [{} for _ in blocks]  # kind -> the flat buffer its tensors are views of
        self.host: list[dict[str, Flat]] = [{} for _ in blocks]
        self.slots: list[dict[str, torch.Tensor]] = []  # per slot: kind -> device memory
        self.slot_owner: list[int | None] = []  # the resident block whose tensors are views into the slot
        # The block whose current data a slot holds (one at most: filling it for another block forgets it), and
        # which of its kinds; a block is held by one slot at most, as filling prefers the slot that holds it.
        self.slot_block: list[int | None] = []
        self.slot_kinds: list[set[str]] = []
        self.slot_ready: list[torch.cuda.Event | None] = []  # the last copies into or out of the slot
        self.slot_flats: dict[tuple[int, int, str], Flat] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.side: SideStream | None = None
        if offload_weights:  # a partial, not a bound method: the hook API marks the callable it is given
            blocks.register_state_dict_post_hook(functools.partial(BlockOffloader._compact_weights, self))

    # ---- the interface ----------------------------------------------------------------------
    def activate(self, block: int, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """Make `block` resident on `device` and send every other block to host memory."""
        self._bind(optimizer, device)
        with torch.no_grad(), self.side.after_compute():
            for b in range(len(self.blocks)):
                if b != block and self._resident(b):
                    self._write_back(b)
            slot = self._load(block)
        if slot is not None:
            self.side.compute_waits(self.slot_ready[slot])

    def prefetch(self, block: int) -> None:
        """Start copying `block` into a free slot, so that activating it next waits for nothing."""
        if self.side is None or self._resident(block):
            return
        with torch.no_grad(), self.side.after_compute():
            on_host = self._on_host(block)
            slot = self._free_slot(block) if on_host else None
            if slot is not None:
                self._fill(slot, block, on_host)

    def restore_weights(self, device: torch.device) -> None:
        """Bring every block's weights back to `device` (inference needs all blocks)."""
        if self.side is None:
            return  # nothing moved yet
        with torch.no_grad(), self.side.after_compute():
            for b, on_device in enumerate(self.weights_on_device):
                if not on_device:
                    holders, tensors = self._contents(b)[WEIGHTS]
                    shapes, dtype = self.at[b][WEIGHTS].shapes, self.at[b][WEIGHTS].dtype
                    target = Flat(self.side.allocate(layout_nbytes(shapes, dtype)), shapes, dtype)
                    self._place(b, WEIGHTS, holders, tensors, target)
                    self.weights_on_device[b] = True
            ready = self.side.mark()
        self.side.compute_waits(ready)

    # ---- residence --------------------------------------------------------------------------
    def _bind(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """Learn the optimizer and device on the first move; saved optimizer state is made per-parameter again."""
        if optimizer is self.optimizer:
            return
        self.optimizer = optimizer
        optimizer.register_state_dict_post_hook(self._compact_optimizer_state)
        if self.side is None:
            self.side = SideStream(device)

    def _resident(self, block: int) -> bool:
        """Whether any of the block's moving tensors are recorded as on the device."""
        return self.state_on_device[block] or (self.offload_weights and self.weights_on_device[block])

    def _contents(self, block: int) -> dict[str, tuple[list[nn.Parameter], list[torch.Tensor]]]:
        """Each moving kind of the block: the parameters holding a tensor of it, and those tensors, as they are now."""
        params = self.params[block]
        contents = {WEIGHTS: (params, params)} if self.offload_weights else {}
        for p in params:
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim > 0:  # scalar step counters stay where the optimizer has them
                    holders, tensors = contents.setdefault(key, ([], []))
                    holders.append(p)
                    tensors.append(value)
        return contents

    def _location(self, block: int, kind: str, tensors: list[torch.Tensor]) -> Flat | None:
        """The flat buffer the tensors are views of; None for tensors the optimizer made or loaded itself."""
        flat = self.at[block].get(kind)
        return flat if flat is not None and flat.ptrs == [t.data_ptr() for t in tensors] else None

    def _on_host(self, block: int) -> dict[str, tuple[list[nn.Parameter], list[torch.Tensor]]]:
        """The block's kinds that are in its host buffers (the rest are already on the device)."""
        on_host = {}
        for kind, (holders, tensors) in self._contents(block).items():
            located = self._location(block, kind, tensors)
            if located is not None and located is self.host[block].get(kind):
                on_host[kind] = (holders, tensors)
        return on_host

    def _write_back(self, block: int) -> None:
        """Send the block's kinds to its host buffers and free its slot."""
        for kind, (holders, tensors) in self._contents(block).items():
            if tensors:
                self._place(block, kind, holders, tensors, self._host_flat(block, kind, tensors))
        for slot, owner in enumerate(self.slot_owner):
            if owner == block:
                self.slot_owner[slot] = None
                self.slot_ready[slot] = self.side.mark()  # the slot is read until then
        self.state_on_device[block] = False
        if self.offload_weights:
            self.weights_on_device[block] = False

    def _load(self, block: int) -> int | None:
        """Make the block resident: its kinds in host memory go to a slot (none are copied if prefetched there)."""
        on_host = self._on_host(block)
        slot = None
        if on_host:
            slot = self._free_slot(block)
            self._fill(slot, block, on_host)
            for kind, (holders, _) in on_host.items():
                flat = self._slot_flat(slot, block, kind, self.host[block][kind])
                self._install(kind, holders, flat.views)
                self.at[block][kind] = flat
            self.slot_owner[slot] = block
        self.state_on_device[block] = True
        self.weights_on_device[block] = True
        return slot

    def _fill(self, slot: int, block: int, on_host: dict) -> None:
        """Copy the block's host kinds into the slot, skipping those it already holds."""
        if self.slot_block[slot] != block:
            self.slot_block[slot], self.slot_kinds[slot] = block, set()
        copied = False
        for kind in on_host:
            source = self.host[block][kind]
            if kind not in self.slot_kinds[slot]:
                copy_to(self._slot_flat(slot, block, kind, source).buffer, source.buffer)
                self.slot_kinds[slot].add(kind)
                copied = True
        if copied:
            self.slot_ready[slot] = self.side.mark()

    def _free_slot(self, block: int) -> int | None:
        """A slot no resident block uses, preferring the one holding this block; a new one while there are < 2."""
        free = [s for s, owner in enumerate(self.slot_owner) if owner is None]
        holding = [s for s in free if self.slot_block[s] == block]
        if holding or free:
            return (holding or free)[0]
        if len(self.slots) == MAX_SLOTS:
            return None
        self.slots.append({})
        self.slot_owner.append(None)
        self.slot_block.append(None)
        self.slot_kinds.append(set())
        self.slot_ready.append(None)
        slot = len(self.slots) - 1
        for b, flats in enumerate(self.host):
            for kind, flat in flats.items():
                self._slot_flat(slot, b, kind, flat)
        return slot

    # ---- flat buffers -----------------------------------------------------------------------
    def _host_flat(self, block: int, kind: str, tensors: list[torch.Tensor]) -> Flat:
        """The block's host buffer for `kind`, made (or remade, if the tensors changed shape) to fit `tensors`."""
        flat = self.host[block].get(kind)
        located = self._location(block, kind, tensors)
        shapes, dtype = (located.shapes, located.dtype) if located else ([t.shape for t in tensors], tensors[0].dtype)
        if flat is None or not flat.fits(shapes, dtype):
            flat = Flat(host_buffer(layout_nbytes(shapes, dtype), pinned=self.side.cuda), shapes, dtype)
            self.host[block][kind] = flat
            for slot in range(len(self.slots)):  # views made now are not made during a later step
                self._slot_flat(slot, block, kind, flat)
        return flat

    def _slot_flat(self, slot: int, block: int, kind: str, like: Flat) -> Flat:
        """Views of the block's `kind` into the slot, laid out like `like`; made once per slot, block and kind."""
        flat = self.slot_flats.get((slot, block, kind))
        if flat is None or not flat.fits(like.shapes, like.dtype):
            if kind not in self.slots[slot]:
                self.slots[slot][kind] = self.side.allocate(self._slot_nbytes(like.dtype))
            flat = Flat(self.slots[slot][kind], like.shapes, like.dtype)
            self.slot_flats[slot, block, kind] = flat
        return flat

    def _slot_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of a slot for one kind: every kind of a block lays out some of its parameters' shapes."""
        return max(layout_nbytes([p.shape for p in params], dtype) for params in self.params)

    def _place(
        self, block: int, kind: str, holders: list[nn.Parameter], tensors: list[torch.Tensor], target: Flat
    ) -> None:
        """Make the block's `kind` views of `target`, copying the data in: one copy from a flat buffer, else one per
        tensor."""
        source = self._location(block, kind, tensors)
        if source is target:
            return
        if source is not None:
            copy_to(target.buffer, source.buffer)
        else:  # made or loaded by the optimizer, or put on the device by Lightning: gathered once
            for view, t in zip(target.views, tensors):
                copy_to(view, t)
            self.side.release(tensors)
            for slot, held in enumerate(self.slot_block):  # a copy of the data these tensors replaced is stale
                if held == block:
                    self.slot_kinds[slot].discard(kind)
        self._install(kind, holders, target.views)
        self.at[block][kind] = target

    def _install(self, kind: str, holders: list[nn.Parameter], views: list[torch.Tensor]) -> None:
        """Point the module (weights) or the optimizer (moments) at the views."""
        if kind == WEIGHTS:
            for p, view in zip(holders, views):
                p.data = view
        else:
            for p, view in zip(holders, views):
                self.optimizer.state[p][kind] = view

    # ---- saving -----------------------------------------------------------------------------
    def _compact_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """The optimizer's state dict with per-parameter tensors (new dicts: the live state keeps its views)."""
        self.side.synchronize()
        state_dict["state"] = {i: {k: compact(v) for k, v in s.items()} for i, s in state_dict["state"].items()}
        return state_dict

    def _compact_weights(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """The blocks' entries of a module state dict as per-parameter tensors."""
        if self.side is not None:
            self.side.synchronize()
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[key] = compact(state_dict[key])
