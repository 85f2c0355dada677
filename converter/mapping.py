"""From a checkpoint's keys to the output's tensors: layout detection and the conversion plan.

Every key of the checkpoint ends in exactly one place: an output tensor, or the list of dropped
keys with the reason. A key that no known layout explains is an error, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from converter import keymaps
from converter.config import ModelConfig
from converter.errors import ConversionError
from converter.source import TensorEntry

_LAYER = "{}"


@dataclass(frozen=True)
class Piece:
    """Rows ``[src_start, src_stop)`` of source tensor ``source`` land at row ``dst_start``."""

    source: str
    src_start: int
    src_stop: int
    dst_start: int


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
    generation: str
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


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape(_LAYER), r"(\d+)") + "$")


def _compile(table: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(_pattern(src), dst) for src, dst in table.items()]


_LAYOUT_PATTERNS = {gen: _compile(table) for gen, table in keymaps.LAYOUTS.items()}
_FORMAT_PATTERNS = {fmt: _compile(table) for fmt, table in keymaps.OUTPUT_FORMATS.items()}


def _translate(key: str, patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in patterns:
        m = pattern.match(key)
        if m:
            return target.replace(_LAYER, m.group(1)) if m.groups() else target
    return None


def _detect_generation(model_keys: Iterable[str], nested: bool) -> str:
    """G3 and G4 are told apart by their attention keys; G1 by nesting under ``model.``.

    A weights-only save of G1 is flat and named like G2; both map the same way, so it is
    reported as G2.
    """
    keys = list(model_keys)
    if any(".attention.qkv_linear.wqkv." in k for k in keys):
        return "G3"
    if any(".attention.qkv_linear." in k for k in keys):
        return "G4"
    return "G1" if nested else "G2"


def _quote(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def plan_conversion(
    tensors: Mapping[str, TensorEntry],
    byte_entries: Iterable[str],
    model: ModelConfig,
    output_format: str,
    export_dtype: str,
    source_name: str,
) -> Plan:
    """Classifies every checkpoint key and maps the model weights to output tensors;
    floating-point weights are written as ``export_dtype`` (a torch dtype's name, or ``keep``)."""
    cast_to = None if export_dtype == "keep" else getattr(torch, export_dtype)
    dropped: list[Dropped] = []
    model_keys: dict[str, str] = {}  # key within the model -> checkpoint key
    unknown: list[str] = []
    nested = any(k.startswith(keymaps.G1_MODEL_PREFIX) for k in tensors)
    has_training_state = False
    for key in [*tensors, *byte_entries]:
        top = key.split(".", 1)[0]
        inner = key[len(keymaps.G1_MODEL_PREFIX) :] if nested and top == "model" else key
        if top in keymaps.TRAINING_STATE:
            dropped.append(Dropped(key, keymaps.TRAINING_STATE[top]))
            has_training_state = True
        elif inner in keymaps.BUFFERS:
            dropped.append(Dropped(key, keymaps.BUFFERS[inner]))
        elif key in tensors and (top == "model" or not nested):
            model_keys[inner] = key
        else:
            unknown.append(key)

    generation = _detect_generation(model_keys, nested)
    layout = _LAYOUT_PATTERNS[generation]
    pivots: dict[str, str] = {}  # pivot key -> checkpoint key
    fused: dict[str, str] = {}  # layer index -> checkpoint key of its fused QKV weight
    for inner, key in model_keys.items():
        pivot = _translate(inner, layout)
        if pivot is None:
            unknown.append(key)
        elif pivot == keymaps.FUSED_QKV:
            fused[inner.split(".")[1]] = key
        else:
            pivots[pivot] = key
    if unknown:
        raise ConversionError(
            f"{source_name} holds keys that no known torchtitan layout explains (detected "
            f"layout {generation}): {_quote(sorted(unknown))}. This converter knows the llama3 "
            "layouts G1-G4 (see README); if this is another model family it is not supported."
        )

    pieces: dict[str, list[Piece]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for pivot, key in pivots.items():
        shape = tensors[key].shape
        pieces[pivot] = [Piece(key, 0, shape[0], 0)]
        shapes[pivot] = shape
    for layer, key in fused.items():
        for pivot, (shape, parts) in _split_fused_qkv(tensors[key], model, source_name).items():
            name = pivot.replace(_LAYER, layer)
            pieces[name], shapes[name] = parts, shape

    tied: list[tuple[str, str]] = []
    if model.tied_embeddings:
        head = pieces.pop(keymaps.TIED_OUTPUT, None)
        if head is not None:  # saved beside the embeddings: must hold the same values
            tied.append((head[0].source, keymaps.TIED_WITH))
        if keymaps.TIED_HEAD_KEPT[output_format]:
            pieces[keymaps.TIED_OUTPUT] = head or pieces.get(keymaps.TIED_WITH, [])
            shapes[keymaps.TIED_OUTPUT] = shapes.get(keymaps.TIED_WITH, ())
        elif head is not None:
            dropped.append(
                Dropped(head[0].source, f"tied embeddings: same values as {keymaps.TIED_WITH}")
            )
    _check_complete(pieces, model, generation, source_name)
    _check_heads(shapes, model, source_name)
    _check_dims(shapes, model, source_name)

    output_names = _FORMAT_PATTERNS[output_format]
    out = []
    for pivot in sorted(pieces, key=_natural_order):
        name = _translate(pivot, output_names)
        assert name is not None, pivot  # every pivot key has a name in every format
        src_dtype = tensors[pieces[pivot][0].source].dtype
        dtype = cast_to if cast_to and src_dtype.is_floating_point else src_dtype
        out.append(OutputTensor(name, shapes[pivot], dtype, tuple(pieces[pivot])))
    tied = [(src, _translate(dst, output_names) or dst) for src, dst in tied]
    if fused:
        assumption = (
            f"the fused QKV weights are split with n_heads={model.n_heads} and "
            f"n_kv_heads={model.kv_heads} as configured: their shapes cannot tell these from "
            "head counts in the same proportion (8/2 from 4/1, which splits differently). "
            "If the model was trained with other head counts, set them and convert again."
        )
    else:
        assumption = (
            f"n_heads={model.n_heads} and n_kv_heads={model.kv_heads} are taken from the "
            "config: the weights fix n_heads x head_dim and the ratio n_kv_heads / n_heads, not "
            "the head count itself (16 heads of 16 and 4 heads of 64 have the same shapes, and "
            "torchtune computes other logits with the wrong one). Check them against the model "
            "that was trained."
        )
    return Plan(generation, not has_training_state, out, dropped, tied, [assumption])


def _split_fused_qkv(
    entry: TensorEntry, model: ModelConfig, source_name: str
) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """Row pieces of G3's fused QKV weight for wq, wk and wv.

    Rows are grouped per kv head: ``[n_kv_heads, n_heads/n_kv_heads + 2, head_dim, dim]``, that
    is each group's query heads, then its key head, then its value head.
    """
    n_heads, n_kv = model.n_heads, model.kv_heads
    rows, dim = entry.shape[0], entry.shape[1:]
    per_group = n_heads // n_kv + 2
    if rows % (n_kv * per_group):
        raise ConversionError(
            f"experiment.model.n_heads={n_heads} and n_kv_heads={model.n_kv_heads} contradict "
            f"{entry.key!r} of shape {entry.shape} in {source_name}: its rows must be "
            f"(n_heads + 2 * n_kv_heads) * head_dim. Set the head counts of the model that "
            "was trained."
        )
    head_dim = rows // (n_kv * per_group)
    q_heads = per_group - 2
    q, k, v = [], [], []
    for g in range(n_kv):
        base = g * per_group * head_dim
        q.append(Piece(entry.key, base, base + q_heads * head_dim, g * q_heads * head_dim))
        k_start = base + q_heads * head_dim
        k.append(Piece(entry.key, k_start, k_start + head_dim, g * head_dim))
        v.append(Piece(entry.key, k_start + head_dim, k_start + 2 * head_dim, g * head_dim))
    return {
        "layers.{}.attention.wq.weight": ((n_heads * head_dim, *dim), q),
        "layers.{}.attention.wk.weight": ((n_kv * head_dim, *dim), k),
        "layers.{}.attention.wv.weight": ((n_kv * head_dim, *dim), v),
    }


def _check_complete(
    pieces: Mapping[str, object], model: ModelConfig, generation: str, source_name: str
) -> None:
    layers = sorted({int(k.split(".")[1]) for k in pieces if k.startswith("layers.")})
    expected = {k.replace(_LAYER, str(i)) for i in layers for k in keymaps.PIVOT_LAYER_KEYS}
    expected |= set(keymaps.PIVOT_GLOBAL_KEYS)
    if model.tied_embeddings and keymaps.TIED_OUTPUT not in pieces:
        expected.discard(keymaps.TIED_OUTPUT)
    missing = sorted(expected - set(pieces))
    if layers and layers != list(range(len(layers))):
        missing += [f"layers.{i}.*" for i in sorted(set(range(layers[-1] + 1)) - set(layers))]
    if missing:
        hint = (
            " The checkpoint has no output weight: if the model ties its embeddings, set "
            "experiment.model.tied_embeddings=true."
            if missing == [keymaps.TIED_OUTPUT]
            else ""
        )
        raise ConversionError(
            f"{source_name} (layout {generation}) lacks model weights: {_quote(missing)} "
            f"(names in Meta style).{hint} A partial model cannot be converted."
        )
    if model.n_layers is not None and model.n_layers != len(layers):
        raise ConversionError(
            f"experiment.model.n_layers={model.n_layers} but {source_name} has {len(layers)} "
            "layers. Fix n_layers in the experiment config."
        )


def _check_heads(
    shapes: Mapping[str, tuple[int, ...]], model: ModelConfig, source_name: str
) -> None:
    """The head counts must fit the weights: query rows split into ``n_heads`` whole heads,
    key rows in proportion ``n_kv_heads / n_heads``, and the attention output projection must
    take exactly the query rows back (which catches a fused QKV split by wrong head counts)."""
    q_rows = shapes["layers.0.attention.wq.weight"][0]
    k_rows = shapes["layers.0.attention.wk.weight"][0]
    o_cols = shapes["layers.0.attention.wo.weight"][-1]
    if (
        q_rows % model.n_heads
        or k_rows * model.n_heads != q_rows * model.kv_heads
        or q_rows != o_cols
    ):
        raise ConversionError(
            f"experiment.model.n_heads={model.n_heads} and n_kv_heads={model.n_kv_heads} "
            f"contradict {source_name}: with them, layer 0 splits into {q_rows} query rows and "
            f"{k_rows} key rows, but its attention output projection takes {o_cols} inputs. Set "
            "the head counts of the model that was trained."
        )


def _check_dims(
    shapes: Mapping[str, tuple[int, ...]], model: ModelConfig, source_name: str
) -> None:
    """Architecture fields that the shapes determine must agree with them when stated: they go
    into the emitted torchtune builder, whose strict load would fail only later, in torchtune."""
    vocab_size, dim = shapes["tok_embeddings.weight"]
    hidden_dim = shapes["layers.0.feed_forward.w1.weight"][0]
    wrong = [
        f"{name}={stated} (the weights say {actual})"
        for name, stated, actual in (
            ("dim", model.dim, dim),
            ("vocab_size", model.vocab_size, vocab_size),
            ("hidden_dim", model.hidden_dim, hidden_dim),
        )
        if stated is not None and stated != actual
    ]
    if wrong:
        raise ConversionError(
            f"experiment.model contradicts {source_name}: {', '.join(wrong)}. Fix these fields "
            "in the experiment config, or leave them out (null): the shapes determine them."
        )


def _natural_order(key: str) -> tuple[int, int, int]:
    """Embeddings, then layer by layer in the pivot table's order, then the final norm and head."""
    if key.startswith("layers."):
        _, layer, rest = key.split(".", 2)
        return (1, int(layer), keymaps.PIVOT_LAYER_KEYS.index("layers.{}." + rest))
    return (0 if key == "tok_embeddings.weight" else 2, 0, keymaps.PIVOT_GLOBAL_KEYS.index(key))
