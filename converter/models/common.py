"""Layouts that several families share because torchtitan builds them from the same module of
``torchtitan/models/common``."""

from __future__ import annotations

from converter.plan import Piece

# The canonical templates of the query, key and value projections (torchtitan 0.3.0's names).
WQ, WK, WV = (f"layers.{{}}.attention.qkv_linear.{w}.weight" for w in ("wq", "wk", "wv"))
WQKV = "layers.{}.attention.qkv_linear.wqkv.weight"


def split_fused_qkv(
    key: str, shape: tuple[int, ...], n_heads: int, n_kv_heads: int, head_dim: int
) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """The pieces of ``wq``, ``wk`` and ``wv`` in a fused ``wqkv`` weight ``key``.

    torchtitan's ``FusedQKVLinear`` (#2878) groups the rows per kv head, ``[n_kv_heads,
    n_heads / n_kv_heads + 2, head_dim, dim]``: each group's query heads, then its key head,
    then its value head. The caller has checked that the counts fit ``shape``."""
    q_heads = n_heads // n_kv_heads
    per_group = (q_heads + 2) * head_dim
    dims = shape[1:]
    q, k, v = [], [], []
    for g in range(n_kv_heads):
        base = g * per_group
        q.append(Piece(key, base, base + q_heads * head_dim, g * q_heads * head_dim))
        k_start = base + q_heads * head_dim
        k.append(Piece(key, k_start, k_start + head_dim, g * head_dim))
        v.append(Piece(key, k_start + head_dim, k_start + 2 * head_dim, g * head_dim))
    return {
        WQ: ((n_heads * head_dim, *dims), q),
        WK: ((n_kv_heads * head_dim, *dims), k),
        WV: ((n_kv_heads * head_dim, *dims), v),
    }
