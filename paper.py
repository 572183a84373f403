"""The paper's Table 1 (SPEC section 1), the one copy of its numbers, and the notation tables use for a block layout.

The model card (hub/card.py) and `main.py report` both read it. torch and the model code are imported inside
functions, because main.py imports report.py on every start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's Table 1, trained with the paper's architecture for `data` (vit.default_arch)."""

    data: str
    model_type: str
    num_blocks: int  # B; 1 for the end-to-end baseline, one block of every layer
    accuracy: float  # top-1 on the test split, in %

    def layout(self) -> tuple[int, ...]:
        """Layers per block, block 0 first, split as the model splits them (DBlockConfig.layout)."""
        from dblock import DBlockConfig
        from vit import default_arch

        return DBlockConfig(num_blocks=self.num_blocks).layout(default_arch(self.data).num_hidden_layers)


PAPER_TABLE1 = (
    PaperResult("cifar100", "vit", 1, 60.25),
    PaperResult("cifar100", "dblock", 3, 59.30),
    PaperResult("tiny-imagenet", "vit", 1, 35.32),
    PaperResult("tiny-imagenet", "dblock", 2, 36.16),
)


def paper_results(data: str | None) -> list[PaperResult]:
    """The paper's rows for a dataset (none for a dataset it does not report)."""
    return [result for result in PAPER_TABLE1 if result.data == data]


def paper_result(data: str, model_type: str) -> PaperResult | None:
    """The paper's result for one model type on one dataset, or None."""
    return next((result for result in paper_results(data) if result.model_type == model_type), None)


def layout_text(layers_per_block: list[int] | tuple[int, ...]) -> str:
    """Blocks and the layers of each, block 0 first: `3 (6,4,2)`."""
    return f"{len(layers_per_block)} ({','.join(map(str, layers_per_block))})"
