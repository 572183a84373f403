"""Keep the blocks that are not being trained off the accelerator.

The released program keeps every block's weights and AdamW moments on the GPU, so only activations
shrink by B. Here, before each step, the drawn block's AdamW moments (and, optionally, its weights)
are copied to the compute device and every other block's are copied to host memory. Tensors are
copied, never recomputed, so training is bit-identical with and without offloading.
"""

from __future__ import annotations

import torch
from torch import nn

HOST = torch.device("cpu")


def copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh copy of t on device (pinned when it lands in host memory beside a GPU, so the copy runs
    asynchronously)."""
    if device.type == "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        return host.copy_(t, non_blocking=t.is_cuda)
    return t.to(device, non_blocking=True, copy=True)


class BlockOffloader:
    """Moves per-block AdamW moments (and optionally weights) between the compute device and host memory.

    Where each block lives is tracked explicitly rather than read off tensor devices, so the same
    code path (real copies) runs on a CPU-only machine, where tests check it changes nothing.
    """

    def __init__(self, blocks: nn.ModuleList, *, offload_weights: bool):
        self.blocks = blocks
        self.offload_weights = offload_weights
        # Lightning puts the whole model (and any restored optimizer state) on the device first.
        self.state_on_device = [True] * len(blocks)
        self.weights_on_device = [True] * len(blocks)

    def _move_state(self, optimizer: torch.optim.Optimizer, block: int, device: torch.device) -> None:
        """Copy the moments of a block's parameters; scalar step counters stay where the optimizer keeps them."""
        for p in self.blocks[block].parameters():
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    state[key] = copy_to(value, device)

    def _move_weights(self, block: int, device: torch.device) -> None:
        """Copy a block's weights; the Parameter objects the optimizer holds stay the same."""
        for p in self.blocks[block].parameters():
            p.data = copy_to(p.data, device)

    def activate(self, block: int, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """Make `block` resident on `device` and send every other block to host memory."""
        for b in range(len(self.blocks)):
            want = b == block
            if self.state_on_device[b] != want:
                self._move_state(optimizer, b, device if want else HOST)
                self.state_on_device[b] = want
            if self.offload_weights and self.weights_on_device[b] != want:
                self._move_weights(b, device if want else HOST)
                self.weights_on_device[b] = want

    def restore_weights(self, device: torch.device) -> None:
        """Bring every block's weights back to `device` (inference needs all blocks)."""
        for b, on_device in enumerate(self.weights_on_device):
            if not on_device:
                self._move_weights(b, device)
                self.weights_on_device[b] = True
