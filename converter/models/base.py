"""What a model family is to the converter, and the planning every family shares.

A family (one module each: ``llama3``, ``qwen3``) holds, as data:

- its layout eras: for each torchtitan PR that renamed the model's keys, a table from the key
  templates saved since then to the family's canonical templates (torchtitan 0.3.0's names);
- its namings: for each output naming it supports (``meta``, ``torchtune``, ``hf``), a table
  from canonical templates to output templates, with the row reordering or expert split that
  the naming needs;

and, as code, what tables cannot say: how the shapes determine the architecture, which keys a
complete model has, and what the output formats write about the model (a ``config.json``, a
torchtune builder). ``build_plan`` turns a checkpoint's index into the conversion plan with
those, so every key of the checkpoint ends in exactly one place: an output tensor, or the list
of dropped keys with the reason. A key that no era explains is an error, never a guess.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import MISSING

from converter.errors import ConversionError
from converter.plan import Dropped, OutputTensor, Piece, Plan, Reorder, RowOrder, row_shape

LAYER = "{}"  # a layer index in a key template
EXPERT = "{e}"  # an expert index in an output template: the canonical tensor is split on dim 0


@dataclass
class ModelConfig:
    """What the converter is told about the model. Each family extends it; a field the shapes
    determine is optional, and checked against them when it is stated."""

    family: str = MISSING
    flavor: str | None = field(
        default=None, metadata={"help": "the torchtitan flavor this preset is (informational)"}
    )
    tied_embeddings: bool = field(
        default=False, metadata={"help": "the output head shares the token embeddings' weights"}
    )
    dim: int | None = field(default=None, metadata={"help": "model width; checked"})
    n_layers: int | None = field(default=None, metadata={"help": "transformer blocks; checked"})
    vocab_size: int | None = field(default=None, metadata={"help": "vocabulary size; checked"})
    hidden_dim: int | None = field(default=None, metadata={"help": "feed-forward width; checked"})
    # MISSING, not None: a preset merged over these defaults keeps a value it does not set,
    # and a family whose shapes give the head count sets None.
    n_heads: int | None = field(default=MISSING, metadata={"help": "attention (query) heads"})
    n_kv_heads: int | None = field(
        default=None, metadata={"help": "key/value heads; null: as n_heads (no grouped-query)"}
    )
    head_dim: int | None = field(default=None, metadata={"help": "per attention head; checked"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = field(default=500000.0, metadata={"help": "RoPE base"})
    max_seq_len: int = field(default=131072, metadata={"help": "context length of the model"})

    def check(self) -> None:
        """Value checks a type cannot express; raises ValueError. A family that extends it
        calls it first: a zero or negative setting no tensor holds would reach the output's
        config as it is (NaN logits, or no context at all)."""
        positive(self, "norm_eps", "rope_theta", "max_seq_len")


def positive(config: ModelConfig, *names: str) -> None:
    """Refuses a setting of ``config`` that is not a positive finite number (zero, negative,
    NaN, infinite); None (not stated) passes."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"experiment.model.{name} must be positive and finite, got {value}")


@dataclass(frozen=True)
class Target:
    """Where a canonical tensor goes in an output naming: ``name`` (with ``{}`` for the layer
    and, to split a stacked ``[E, ...]`` tensor per expert, ``{e}``), rows reordered per head
    if ``reorder`` is given."""

    name: str
    reorder: RowOrder | None = None


@dataclass(frozen=True)
class Era:
    """The keys torchtitan saved for a family from one PR on.

    ``keys`` maps saved key templates to canonical ones; a value of ``None`` marks a key that
    is saved but never converted (listed in ``dropped`` with its reason). ``split`` names saved
    templates that hold several canonical tensors; the family's ``split`` method divides them.
    """

    name: str  # e.g. "#2878": the torchtitan PR that introduced the layout
    title: str
    since: str  # the PR's date, or a torchtitan version
    keys: Mapping[str, str | None]
    split: frozenset[str] = frozenset()
    nested: bool = False  # model keys under "model." (torchtitan before #1347)
    dropped: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name} ({self.title}, {self.since})"


# Top-level entries of a full (resumable) torchtitan checkpoint that are not the model, and why
# each is left out. Matched on the first dotted component only: optimizer keys contain model
# FQNs as substrings, so a loose pattern would mistake them for weights.
TRAINING_STATE: dict[str, str] = {
    "optimizer": "optimizer state (training only)",
    "lr_scheduler": "learning-rate scheduler state (training only)",
    "dataloader": "dataloader position (training only)",
    "train_state": "trainer step counters (training only)",
}
NESTED_PREFIX = "model."  # the model's keys in a checkpoint of torchtitan before #1347


@dataclass
class Source:
    """The model's saved tensors, as the planning sees them: their shapes and dtypes, and a way
    to read a small one whole (for value checks)."""

    name: str  # the step folder, for messages
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]


class ModelFamily(ABC):
    """One model family: its eras and namings as data, and what the shapes determine."""

    name: ClassVar[str]
    config: ClassVar[type[ModelConfig]]
    eras: ClassVar[tuple[Era, ...]]  # newest first
    # Canonical templates in the order the output lists them (the naming may split one).
    order: ClassVar[tuple[str, ...]]
    namings: ClassVar[Mapping[str, Mapping[str, Target]]]
    # Why a naming the family lacks cannot hold it, for the error.
    unsupported: ClassVar[Mapping[str, str]] = {}
    # (head, embeddings) canonical keys that tied embeddings make equal.
    tied: ClassVar[tuple[str, str]] = ("lm_head.weight", "tok_embeddings.weight")

    # ---------------------------------------------------------------- what a family says

    @abstractmethod
    def architecture(self, shapes: Mapping[str, tuple[int, ...]], config: Any) -> Any:
        """``config`` with every field the canonical tensors' ``shapes`` determine filled in;
        raises ConversionError where a stated field contradicts them."""

    @abstractmethod
    def required(self, arch: Any, layer: int) -> list[str]:
        """The canonical templates that layer ``layer`` of a complete model has."""

    def optional(self, arch: Any, layer: int) -> list[str]:
        """Canonical templates that layer ``layer`` may have beside the required ones, which
        ``check_values`` leaves out or refuses."""
        return []

    def split(
        self,
        template: str,
        key: str,
        shape: tuple[int, ...],
        config: Any,
        source: str,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
        """A saved tensor that holds several canonical ones (``Era.split``): canonical
        template -> (shape, row pieces of ``key``). ``shapes``: the model's saved tensors (by
        their key within the model), for a split that its neighbours' shapes determine."""
        raise NotImplementedError(template)

    def check_values(
        self, source: Source, era: Era, keys: Mapping[str, str], arch: Any
    ) -> list[Dropped]:
        """Checks of saved values the output depends on (run before anything is written);
        returns canonical keys to leave out after all (not buffers). ``keys``: canonical key ->
        saved key, and the buffers the era leaves out (``Era.dropped``), by their template."""
        return []

    def assumptions(self, arch: Any, era: Era, keys: Collection[str]) -> list[str]:
        """What the plan takes from the config that the saved tensors (``keys``, as
        ``check_values`` gets them) cannot confirm."""
        return []

    def reorder_block(self, arch: Any) -> int:
        """The rows a ``Target.reorder`` works on at a time: one attention head's."""
        return arch.head_dim

    def torchtune_model(self, arch: Any) -> dict[str, Any] | None:
        """torchtune's builder of this model (a ``model:`` section), for the recipe snippet
        written with an output; None where torchtune has none."""
        return None

    def torchtune_model_type(self, arch: Any) -> str | None:
        """The ``model_type`` torchtune's checkpointers take for this model."""
        return None

    def presets(self) -> str:
        return f"experiment/model={self.name}/<flavor> (conf/experiment/model/{self.name}/)"

    def settings_assumed(self, settings: Mapping[str, Any]) -> str:
        """The assumption that names ``settings``: values the output states (config.json, the
        torchtune builder) that no saved tensor holds, so that a wrong one computes other
        logits unseen."""
        stated = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                           for k, v in settings.items())  # fmt: skip
        return (
            f"{stated} are taken from the config: no saved tensor holds them, and a consumer "
            "computes other logits with other values. Check them against the model that was "
            f"trained, or use its preset: {self.presets()}."
        )

    # ---------------------------------------------------------------- matching an era

    def match(self, model_keys: Iterable[str], nested: bool) -> tuple[Era | None, list[str]]:
        """The era that explains the model's keys, or the one that explains most of them, with
        the keys it leaves unexplained; no era, and every key, if the family was never saved
        ``nested`` so."""
        keys = list(model_keys)
        best: tuple[Era | None, list[str]] = None, keys
        for era in self.eras:
            if era.nested != nested:
                continue
            unknown = [k for k in keys if _translate(k, _patterns(era)) is _UNKNOWN]
            if not unknown:
                return era, []
            if best[0] is None or len(unknown) < len(best[1]):
                best = era, unknown
        return best


def build_plan(
    family: ModelFamily,
    config: Any,
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    byte_entries: Iterable[str],
    naming: str,
    keeps_tied_head: bool,
    export_dtype: torch.dtype | None,
    read: Callable[[str], torch.Tensor],
    source_name: str,
    others: Iterable[ModelFamily] = (),
) -> tuple[Plan, Any]:
    """The plan of a conversion of ``tensors`` (saved key -> (shape, dtype)) into ``naming``,
    and the model's architecture. ``keeps_tied_head``: the format writes the head of a tied
    model (a copy of the embeddings). ``export_dtype``: floating tensors are cast to it (None:
    kept as saved). ``read`` loads a small saved tensor whole, for value checks. ``others``:
    the other families, named in the error when one of them explains the keys."""
    dropped: list[Dropped] = []
    model: dict[str, str] = {}  # key within the model -> saved key
    buffers: dict[str, str] = {}  # saved but never converted (Era.dropped) -> saved key
    # Most of the model's keys under "model.", not any: one stray key must not make every
    # other key unknown.
    model_like = [k for k in tensors if k.split(".", 1)[0] not in TRAINING_STATE]
    nested = 2 * sum(k.startswith(NESTED_PREFIX) for k in model_like) > len(model_like)
    has_training_state = False
    unknown: list[str] = []
    for key in [*tensors, *byte_entries]:
        top = key.split(".", 1)[0]
        if top in TRAINING_STATE:
            dropped.append(Dropped(key, TRAINING_STATE[top]))
            has_training_state = True
        elif key in tensors and (not nested or key.startswith(NESTED_PREFIX)):
            model[key.removeprefix(NESTED_PREFIX) if nested else key] = key
        else:
            unknown.append(key)

    era, unexplained = family.match(model, nested)
    unknown += [model[k] for k in unexplained]
    if unknown or era is None:
        raise ConversionError(
            _unknown_keys(
                family, era, sorted(unknown), unexplained, list(model), nested, source_name, others
            )
        )

    canonical: dict[str, tuple[tuple[int, ...], list[Piece]]] = {}
    patterns = _patterns(era)
    model_shapes = {inner: tensors[key][0] for inner, key in model.items()}
    for inner, key in model.items():
        found = _translate(inner, patterns)
        assert found is not _UNKNOWN
        template, layer, target = found
        shape, dtype = tensors[key]
        if target is not None and not dtype.is_floating_point:
            raise ConversionError(
                f"{source_name} holds {key!r} as {str(dtype).removeprefix('torch.')}, but every "
                f"weight of a torchtitan {family.name} model is floating point: this is not a "
                "checkpoint of its training (a quantized export?). Nothing was written."
            )
        if target is None:
            dropped.append(Dropped(key, era.dropped[template]))
            buffers[_fill(template, layer)] = key
        elif template in era.split:
            for part, (part_shape, pieces) in family.split(
                template, key, shape, config, source_name, model_shapes
            ).items():
                canonical[_fill(part, layer)] = (part_shape, pieces)
        else:
            canonical[_fill(target, layer)] = (shape, [Piece(key, 0, row_shape(shape)[0], 0)])

    head, embeddings = family.tied
    tied: list[tuple[str, str]] = []
    if config.tied_embeddings and head in canonical:
        # Saved beside the embeddings: it must hold their values (checked before publishing).
        tied.append((canonical[head][1][0].source, embeddings))
        if not keeps_tied_head:
            source = canonical.pop(head)[1][0].source
            dropped.append(Dropped(source, f"tied embeddings: same values as {embeddings}"))
    elif config.tied_embeddings and keeps_tied_head and embeddings in canonical:
        canonical[head] = canonical[embeddings]

    _check_uniform(canonical, source_name)
    arch = family.architecture({k: shape for k, (shape, _) in canonical.items()}, config)
    _check_complete(family, arch, canonical, config, era, source_name)
    saved = {**{k: pieces[0].source for k, (_, pieces) in canonical.items()}, **buffers}
    shapes = {k: v[0] for k, v in tensors.items()}
    for gone in family.check_values(Source(source_name, shapes, read), era, saved, arch):
        assert gone.key in canonical, f"{family.name}.check_values left out a buffer: {gone}"
        canonical.pop(gone.key)
        dropped.append(Dropped(saved[gone.key], gone.reason))

    # After the checks of the checkpoint itself, which hold whatever the format: a problem
    # of the source is reported first, not after the user has changed the format.
    if naming not in family.namings:
        why = family.unsupported.get(naming, "")
        raise ConversionError(
            f"output_format={naming} cannot hold a {family.name} model{': ' + why if why else ''}"
            f". Choose output_format={' or '.join(family.namings)}."
        )
    names = family.namings[naming]
    plan = Plan(
        family=family.name,
        layout=era.name,
        weights_only=not has_training_state,
        tensors=_outputs(family, arch, canonical, names, tensors, export_dtype),
        dropped=dropped,
        tied=[(src, _output_name(names, emb)) for src, emb in tied],
        assumptions=family.assumptions(arch, era, saved),
    )
    return plan, arch


def check_stated(config: Any, derived: Mapping[str, int], source_name: str) -> None:
    """Every field of ``config`` that ``derived`` gives (what the shapes say) must agree with
    it where stated: they go into the files written beside the output (a torchtune builder, a
    config.json), whose strict load would fail only later, or load a different model."""
    wrong = [
        f"{name}={getattr(config, name)} (the weights say {actual})"
        for name, actual in derived.items()
        if getattr(config, name) is not None and getattr(config, name) != actual
    ]
    if wrong:
        raise ConversionError(
            f"experiment.model contradicts {source_name}: {', '.join(wrong)}. Fix these fields "
            "in the experiment config, or leave them out (null): the shapes determine them."
        )


# -------------------------------------------------------------------- tables as patterns


class _Unknown:
    """No template of the table matches the key."""


_UNKNOWN = _Unknown()
# A layer index as torchtitan writes one (str(int)): "01" is not layer 1, so a key spelled so
# is unknown rather than a second tensor for the same place.
_INDEX = r"(0|[1-9][0-9]*)"
_PATTERN_CACHE: dict[int, list[tuple[re.Pattern[str], str, str | None]]] = {}


def _patterns(era: Era) -> list[tuple[re.Pattern[str], str, str | None]]:
    if id(era) not in _PATTERN_CACHE:
        _PATTERN_CACHE[id(era)] = [
            (re.compile(re.escape(src).replace(re.escape(LAYER), _INDEX) + "$"), src, dst)
            for src, dst in era.keys.items()
        ]
    return _PATTERN_CACHE[id(era)]


def _translate(
    key: str, patterns: list[tuple[re.Pattern[str], str, str | None]]
) -> tuple[str, str | None, str | None] | _Unknown:
    """``(saved template, layer, canonical template)`` of ``key``, or _UNKNOWN."""
    for pattern, template, target in patterns:
        m = pattern.match(key)
        if m:
            return template, (m.group(1) if m.groups() else None), target
    return _UNKNOWN


def _fill(template: str, layer: str | None) -> str:
    return template if layer is None else template.replace(LAYER, layer, 1)


def _template_of(key: str) -> tuple[str, int | None]:
    """``("layers.{}.x", 3)`` for ``"layers.3.x"``; ``(key, None)`` for a global key."""
    m = re.match(r"layers\.(\d+)\.", key)
    if not m:
        return key, None
    return f"layers.{LAYER}." + key[m.end() :], int(m.group(1))


def _output_name(names: Mapping[str, Target], key: str) -> str:
    template, layer = _template_of(key)
    return _fill(names[template].name, None if layer is None else str(layer))


# -------------------------------------------------------------------- planning steps


def _check_uniform(
    canonical: Mapping[str, tuple[tuple[int, ...], list[Piece]]], source_name: str
) -> None:
    """A weight has the same shape in every layer that has it: a family's architecture reads
    its sizes from the first such layer, and the files written beside the output (a
    config.json, a torchtune builder) give every layer those sizes."""
    first: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, (shape, _) in canonical.items():
        template, layer = _template_of(key)
        if layer is None:
            continue
        seen, seen_shape = first.setdefault(template, (key, shape))
        if shape != seen_shape:
            raise ConversionError(
                f"The layers of {source_name} differ in size: {seen} is {seen_shape}, but {key} "
                f"is {shape} (names as torchtitan 0.3.0 saves them). A config.json or a "
                "torchtune builder gives every layer the same sizes; such a model cannot be "
                "converted."
            )


def _check_complete(
    family: ModelFamily,
    arch: Any,
    canonical: Mapping[str, object],
    config: Any,
    era: Era,
    source_name: str,
) -> None:
    """Every tensor the architecture requires is there, and nothing it has no place for: a
    consumer would ignore such a tensor (transformers lists it as unexpected and goes on)."""
    layers = sorted({layer for k in canonical if (layer := _template_of(k)[1]) is not None})
    expected = {_fill(t, str(i)) for i in layers for t in family.required(arch, i)}
    expected |= {t for t in family.order if LAYER not in t}
    head, _ = family.tied
    if config.tied_embeddings and head not in canonical:
        expected.discard(head)
    optional = {_fill(t, str(i)) for i in layers for t in family.optional(arch, i)}
    if extra := sorted(set(canonical) - expected - optional):
        raise ConversionError(
            f"{source_name} (layout {era.describe()}) holds weights that the {family.name} model "
            f"its other weights describe has no place for: {_quote(extra)} (names as torchtitan "
            "0.3.0 saves them). Its consumers would load the model without them, and no "
            f"torchtitan {family.name} model saves such a set: this is another model. Nothing "
            "was written."
        )
    missing = sorted(expected - set(canonical))
    if layers and layers != list(range(len(layers))):
        missing += [f"layers.{i}.*" for i in sorted(set(range(layers[-1] + 1)) - set(layers))]
    if missing:
        hint = (
            " The checkpoint has no output weight: if the model ties its embeddings, set "
            "experiment.model.tied_embeddings=true."
            if missing == [head]
            else ""
        )
        raise ConversionError(
            f"{source_name} (layout {era.describe()}) lacks model weights: {_quote(missing)} "
            f"(names as torchtitan 0.3.0 saves them).{hint} A partial model cannot be converted."
        )


def _sort_key(family: ModelFamily, key: str) -> tuple[int, int, int]:
    """Globals before the first layer template in ``family.order`` (the embeddings), then
    layer by layer in the table's order, then the other globals (final norm, head)."""
    template, layer = _template_of(key)
    index = family.order.index(template)
    if layer is not None:
        return (1, layer, index)
    first_layer = next(i for i, t in enumerate(family.order) if LAYER in t)
    return (0 if index < first_layer else 2, 0, index)


def _outputs(
    family: ModelFamily,
    arch: Any,
    canonical: Mapping[str, tuple[tuple[int, ...], list[Piece]]],
    names: Mapping[str, Target],
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    export_dtype: torch.dtype | None,
) -> list[OutputTensor]:
    out = []
    for key in sorted(canonical, key=lambda k: _sort_key(family, k)):
        shape, pieces = canonical[key]
        template, _ = _template_of(key)
        target = names[template]
        dtype = export_dtype or tensors[pieces[0].source][1]
        reorder = Reorder(target.reorder, family.reorder_block(arch)) if target.reorder else None
        name = _output_name(names, key)
        if EXPERT not in name:
            out.append(OutputTensor(name, shape, dtype, _placed(pieces, 0, None, reorder)))
            continue
        # One output per expert: expert e is rows [e * n, (e + 1) * n) of the stacked tensor.
        n = row_shape(shape)[0] // shape[0]
        for e in range(shape[0]):
            placed = _placed(pieces, e * n, (e + 1) * n, reorder)
            out.append(OutputTensor(name.replace(EXPERT, str(e)), shape[1:], dtype, placed))
    return out


def _placed(
    pieces: list[Piece], lo: int, hi: int | None, reorder: Reorder | None
) -> tuple[Piece, ...]:
    """The pieces that fill rows ``[lo, hi)`` of a canonical tensor, placed from row 0."""
    out = []
    for p in pieces:
        start, stop = p.dst_start, p.dst_start + p.src_stop - p.src_start
        a, b = max(start, lo), stop if hi is None else min(stop, hi)
        if a < b:
            src = p.src_start + a - start
            out.append(Piece(p.source, src, src + b - a, a - lo, reorder))
    return tuple(out)


# torchtitan's and PEFT's names for a LoRA adapter's two factors.
_LORA = re.compile(r"\.lora_(embedding_)?[abAB](\.|$)")


def _quote(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _unknown_keys(
    family: ModelFamily,
    era: Era | None,
    unknown: list[str],
    unexplained: list[str],
    model_keys: list[str],
    nested: bool,
    source_name: str,
    others: Iterable[ModelFamily],
) -> str:
    """The error for keys that no era of ``family`` explains; it names another family only if
    ``family`` leaves some of the model's keys unexplained (``unexplained``) and that one
    explains every key of the model (``model_keys``): a stray key another family knows does
    not make the model that family's."""
    hint = ""
    for other in others:
        if other is family or not unexplained:
            continue
        other_era, left = other.match(model_keys, nested)
        if other_era is not None and not left:
            hint = (
                f" They are the keys of a {other.name} model (layout {other_era.describe()}): "
                f"choose a {other.name} preset, {other.presets()}."
            )
    if not hint and any(_LORA.search(k) for k in unknown):
        hint = (
            " Some are LoRA adapter weights (lora_a, lora_b), which no torchtitan layout of a "
            "base model holds: this converter does not merge adapters. Merge them into the "
            "base weights and save, then convert that checkpoint."
        )
    closest = (
        f"{family.name} layout {era.describe()}"
        if era
        else f"none: {family.name} was never saved under {NESTED_PREFIX!r}"
    )
    known = "; ".join(f"{f.name} ({', '.join(e.name for e in f.eras)})" for f in {family, *others})
    return (
        f"{source_name} holds keys that no known torchtitan layout explains (closest: "
        f"{closest}): {_quote(unknown)}.{hint} This converter knows the torchtitan families and "
        f"layouts {known} (see README); another model family is not supported."
    )
