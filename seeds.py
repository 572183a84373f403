"""Integer seeds derived from the run's --seed: the one hash behind every per-step, per-epoch and per-sample seed."""

from __future__ import annotations


def mix_seed(seed: int, value: int, multiplier: int = 1_000_003, bits: int = 63) -> int:
    """(seed * multiplier + value) mod 2**bits: a seed for `value`'s own generator, distinct for each value.

    Chained calls fold in several values; reducing at every link gives the same number as reducing once at the end.
    """
    return (seed * multiplier + value) % (2**bits)
