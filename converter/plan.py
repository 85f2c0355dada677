"""The conversion plan: every output tensor as pieces of source tensors, every other key dropped
with its reason. A model family makes the plan (``converter.models``); the engine carries it out
and never names a key.

Tensors are addressed as *rows*: a tensor of shape ``(..., C)`` is ``prod(...)`` rows of ``C``
values (a 1-D tensor of ``N`` values is ``N`` rows of one). FSDP2 and expert parallelism shard
along dim 0, so a stored chunk is a run of whole rows, and every transform the families need is
a choice of rows: a fused QKV weight is split into row ranges, stacked experts ``[E, F, D]`` into
``E`` ranges of ``F`` rows, and Hugging Face's RoPE convention reorders the rows within each
attention head. The engine therefore streams any tensor in windows of rows, in bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, values per row)`` of a tensor of ``shape``."""
    if len(shape) < 2:
        return (shape[0] if shape else 1), 1
    return math.prod(shape[:-1]), shape[-1]


class RowOrder(Enum):
    """How rows are reordered within each block of ``block`` rows on their way to the output.

    ``rope_halves``: torchtitan's llama3 rotates interleaved pairs of a head's dimensions (the
    complex RoPE of Meta's reference code); Hugging Face rotates its first half against its
    second. The rows of each head, ``2j + i`` for pair ``j`` and element ``i``, become
    ``i * head_dim / 2 + j``: what torchtitan's ``Llama3StateDictAdapter._permute`` does to
    ``wq`` and ``wk`` in ``to_hf``.
    """

    rope_halves = "rope_halves"

    def copy(self, rows: torch.Tensor, block: int, into: torch.Tensor) -> None:
        """Copies ``rows`` (2-D, a whole number of blocks) reordered into ``into`` (as many
        values, contiguous, of any dtype): the reordering and the cast are one pass."""
        n, width = rows.shape
        pairs = rows.view(n // block, block // 2, 2, width).transpose(1, 2)
        into.view(n // block, 2, block // 2, width).copy_(pairs)


@dataclass(frozen=True)
class Reorder:
    """A row reordering within blocks of ``block`` rows (a head's rows, say)."""

    order: RowOrder
    block: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[src_start, src_stop)`` of source tensor ``source`` land at row ``dst_start`` of
    the output tensor, reordered by ``reorder`` if given (then both ends are whole blocks)."""

    source: str
    src_start: int
    src_stop: int
    dst_start: int
    reorder: Reorder | None = None


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Dropped:
    key: str
    reason: str


@dataclass
class Plan:
    """What a conversion writes, and what it leaves out."""

    family: str
    layout: str  # the layout era of the source, named for the torchtitan PR that introduced it
    weights_only: bool
    tensors: list[OutputTensor]
    dropped: list[Dropped]
    # (source key, output name) pairs that must hold equal values: tied embeddings.
    tied: list[tuple[str, str]] = field(default_factory=list)
    # What the plan takes from the config that the checkpoint cannot confirm, for the log.
    assumptions: list[str] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        return {p.source for t in self.tensors for p in t.pieces}

    def left_out(self) -> list[str]:
        """What is left out, a line per reason with its first keys: for the log and the
        dry run (the manifest lists every key)."""
        reasons: dict[str, list[str]] = {}
        for d in self.dropped:
            reasons.setdefault(d.reason, []).append(d.key)
        return [
            f"{len(keys)} x {reason}: {', '.join(keys[:2])}"
            + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")
            for reason, keys in reasons.items()
        ]
