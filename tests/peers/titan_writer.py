"""Write real torchtitan checkpoints with torchtitan's own CheckpointManager.

Two CPU ranks on gloo train a small llama3 model for a few steps and save what a real
torchtitan 0.3.0 run saves:

* ``<dump>/checkpoint/step-<N>/`` for every ``N`` that is a multiple of ``interval``: a full,
  resumable checkpoint (float32 model keys at the top level beside ``optimizer``,
  ``lr_scheduler``, ``dataloader`` and ``train_state``);
* ``<dump>/checkpoint/step-<steps>/``: the last step, model keys only, cast to
  ``export_dtype`` (``last_save_model_only=True``, the torchtitan default).

The model is built, sharded and initialised the way torchtitan's trainer does it: built on
the meta device, FSDP2-wrapped by torchtitan's ``apply_fsdp_to_decoder`` over a ``"cpu"``
device mesh of two ranks, ``to_empty`` then ``init_weights``. The optimizer and LR schedule
are torchtitan's containers (AdamW). Flex attention has no CPU backward, so gradients are
set by hand (deterministic random values) instead of running a backward pass.

Next to the checkpoint the writer leaves:

* ``<dump>/model.json``: the model dimensions a converter config and a torchtune builder
  need (see :func:`model_dims`), plus what was saved at which step;
* ``<dump>/reference.pt``: fixed ``tokens`` and, for every saved step, logits of
  torchtitan's own model forward (float32, ``torch.no_grad()``) from the training weights
  (``logits``) and from the weights exactly as saved, up-cast to float32 (``logits_saved``;
  it differs from ``logits`` only for a bfloat16/float16 export). See :func:`load_reference`.

Variants (``--variant``):

* ``debugmodel``: torchtitan's llama3 ``debugmodel`` (dim 256, 6 layers, 16 heads, MHA,
  separate ``lm_head``, llama3.1 RoPE scaling with factor 8).
* ``gqa_tied``: a config of our own from torchtitan's config classes: 3 layers, 8 query
  heads over 2 kv heads, ``enable_weight_tying=True`` (Llama 3.2 style), vocab 3072, FFN
  hidden dim 1024, RoPE scaling factor 8 like torchtitan's own 1B/3B configs (Meta's
  Llama 3.2 and torchtune's ``llama3_2`` builder default use 32). ``--rope-factor`` changes
  the factor of either variant.

Usage::

    python tests/peers/titan_writer.py DUMP [--variant debugmodel|gqa_tied]
        [--export-dtype float32|bfloat16|float16] [--steps 3] [--interval 2]
        [--last-save-full] [--rope-factor F] [--lr 0.03] [--seq-len 64] [--seed 0]
        [--compiled-attention] [--verbose]

or ``write_checkpoints(dump, variant=..., export_dtype=...)`` from Python (same options).
Other model families plug into the same job through :class:`ModelHooks` (``family=``, see
``HOOKS``): ``tests/peers/qwen3_writer.py`` writes qwen3 with it.
With the defaults: ``step-2`` full float32, ``step-3`` model-only in ``export_dtype``.

Reference logits run torchtitan's flex attention and block-mask creation eagerly by
default: torchtitan wraps both in ``torch.compile`` (flex with max-autotune), which costs
20-30 s per process on a cold inductor cache on this machine; eager and compiled logits
agreed to about 1e-6 here. ``--compiled-attention`` keeps torchtitan's compiled functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

VARIANTS = ("debugmodel", "gqa_tied")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
WORLD_SIZE = 2
REFERENCE_BATCH = 2
REFERENCE_SEQ_LEN = 64
REFERENCE_TOKENS_SEED = 1234
# AdamW moves every weight by about lr per step. 0.03 over 3 steps sharpens attention
# enough that a wrong RoPE scaling factor, theta, q/k permutation or kv-head order moves
# the logits by more than 1e-3 while a correct float32 load stays within ~1e-5.
DEFAULT_LR = 0.03
CHECKPOINT_FOLDER = "checkpoint"


# --------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------


def model_config(
    variant: str = "debugmodel",
    attn_backend: str = "flex",
    rope_factor: float | None = None,
    rope_scaling: bool = True,
):
    """Return the torchtitan ``Llama3Model.Config`` of a variant (see module docstring).

    ``rope_factor`` replaces the llama RoPE scaling factor of every layer (torchtitan's
    configs all use its default, 8.0); ``rope_scaling=False`` turns the scaling off, as
    torchtitan's llama3 was before #1839.
    """
    cfg = _variant_config(variant, attn_backend)
    for layer in cfg.layers:
        if rope_factor is not None:
            layer.attention.rope = dataclasses.replace(
                layer.attention.rope, scaling_factor=float(rope_factor)
            )
        if not rope_scaling:
            layer.attention.rope = dataclasses.replace(layer.attention.rope, scaling="none")
    return cfg


def model_config_of(model_json: dict):
    """The ``Llama3Model.Config`` a ``model.json`` describes (its variant and RoPE scaling)."""
    return model_config(model_json["variant"], rope_scaling=model_json["rope_scaling"] is not None)


def _variant_config(variant: str, attn_backend: str):
    from torchtitan.models.llama3 import llama3_configs

    if variant == "debugmodel":
        return llama3_configs["debugmodel"](attn_backend=attn_backend)
    if variant == "gqa_tied":
        # torchtitan's own helpers, the same path its 1B/3B (tied, GQA) configs take.
        from torchtitan.models.common import compute_ffn_hidden_dim

        return dims_config(
            dim=256,
            n_layers=3,
            n_heads=8,
            n_kv_heads=2,
            vocab_size=3072,
            hidden_dim=compute_ffn_hidden_dim(256, multiple_of=256, ffn_dim_multiplier=1.5),
            tied=True,
            attn_backend=attn_backend,
        )
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def dims_config(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    hidden_dim: int,
    tied: bool,
    attn_backend: str = "flex",
):
    """A torchtitan ``Llama3Model.Config`` of these dimensions, built with torchtitan's own
    helpers as its 1B/3B configs are: RoPE theta 500000 with llama scaling (factor 8, as
    torchtitan's 1B/3B; Meta's Llama 3.2 and torchtune's ``llama3_2`` default use 32)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import (
        _EMBEDDING_SKIP_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )

    return Llama3Model.Config(
        dim=dim,
        vocab_size=vocab_size,
        enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab_size, embedding_dim=dim, param_init=_EMBEDDING_SKIP_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(
            in_features=dim, out_features=vocab_size, param_init=_output_linear_init(dim)
        ),
        layers=_build_llama3_layers(
            fuse_qkv=True,
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=hidden_dim,
            rope=ComplexRoPE.Config(
                dim=dim // n_heads, max_seq_len=131072, theta=500000, scaling="llama"
            ),
            attn_backend=attn_backend,
        ),
    )


def shape_config(shape: Any):
    """``dims_config`` of a ``demo.writer.ModelShape``."""
    return dims_config(
        dim=shape.dim,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        vocab_size=shape.vocab_size,
        hidden_dim=shape.hidden_dim,
        tied=shape.tied_embeddings,
    )


def titan_to_hf(cfg, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What torchtitan 0.3.0's own ``Llama3StateDictAdapter.to_hf`` makes of a model state
    dict with torchtitan 0.3.0's keys, for the model ``cfg`` (offline, no process group)."""
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    return Llama3StateDictAdapter(cfg, None).to_hf(dict(state_dict))


def meta_to_titan(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-style names back to torchtitan 0.3.0's module names, written out by hand here so
    the checks do not lean on the converter's own key tables."""
    out = {}
    for key, value in weights.items():
        for proj in ("wq", "wk", "wv"):
            key = key.replace(f".attention.{proj}.", f".attention.qkv_linear.{proj}.")
        out["lm_head.weight" if key == "output.weight" else key] = value
    return out


def model_dims(cfg) -> dict[str, Any]:
    """The dimensions of a torchtitan ``Llama3Model.Config`` as plain JSON values.

    Keys: dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, hidden_dim, norm_eps,
    rope_theta, rope_scaling (``None`` or a dict: type, factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings), max_seq_len, tied, fused_qkv.
    """
    from torchtitan.models.common.attention import FusedQKVLinear

    layer = cfg.layers[0]
    attn = layer.attention
    rope = attn.rope
    n_heads = attn.n_heads
    n_kv_heads = attn.n_kv_heads if attn.n_kv_heads is not None else n_heads
    head_dim = attn.head_dim if attn.head_dim is not None else cfg.dim // n_heads
    eps = {cfg.norm.eps}
    for block in cfg.layers:
        eps |= {block.attention_norm.eps, block.ffn_norm.eps}
    if len(eps) != 1:
        raise ValueError(f"mixed RMSNorm eps in one model: {sorted(eps)}")
    if rope.scaling == "llama":
        scaling = {
            "type": "llama",
            "factor": float(rope.scaling_factor),
            "low_freq_factor": float(rope.low_freq_factor),
            "high_freq_factor": float(rope.high_freq_factor),
            "original_max_position_embeddings": int(rope.original_max_position_embeddings),
        }
    elif rope.scaling == "none":
        scaling = None
    else:
        raise ValueError(f"RoPE scaling {rope.scaling!r} has no torchtune llama3 equivalent")
    return {
        "dim": cfg.dim,
        "n_layers": len(cfg.layers),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_dim": layer.feed_forward.w1.out_features,
        "norm_eps": eps.pop(),
        "rope_theta": float(rope.theta),
        "rope_scaling": scaling,
        "max_seq_len": int(rope.max_seq_len),
        "tied": bool(cfg.enable_weight_tying),
        "fused_qkv": isinstance(attn.qkv_linear, FusedQKVLinear.Config),
    }


# --------------------------------------------------------------------------------------
# Forward pass and weights on one process
# --------------------------------------------------------------------------------------


def reference_tokens(vocab_size: int, seq_len: int = REFERENCE_SEQ_LEN) -> torch.Tensor:
    """The fixed token batch the reference logits are computed on (int64, (2, seq_len))."""
    gen = torch.Generator().manual_seed(REFERENCE_TOKENS_SEED)
    return torch.randint(0, vocab_size, (REFERENCE_BATCH, seq_len), generator=gen)


@contextlib.contextmanager
def _flex_attention_mode(compiled: bool):
    """Run torchtitan's flex attention and block-mask creation compiled (as torchtitan
    does, with ``torch.compile``) or eagerly (same ops, no inductor compile)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torchtitan.models.common import attention

    saved_attn = attention.FlexAttention.__dict__["_compiled_flex_attn"]
    saved_mask = attention._compiled_create_block_mask
    if not compiled:
        attention.FlexAttention._compiled_flex_attn = flex_attention
        attention._compiled_create_block_mask = create_block_mask
    try:
        with _quiet_eager_flex_warning():
            yield
    finally:
        attention.FlexAttention._compiled_flex_attn = saved_attn
        attention._compiled_create_block_mask = saved_mask


@contextlib.contextmanager
def _quiet_eager_flex_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def build_unsharded(cfg) -> torch.nn.Module:
    """A plain (no FSDP) torchtitan model on CPU in eval mode, for loading weights into.

    Built directly on CPU: the constructor already fills the non-persistent RoPE cache, and
    every parameter is overwritten by a strict ``load_state_dict`` (no ``init_weights``).
    """
    return cfg.build().eval()


@torch.no_grad()
def titan_logits(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    compiled_attention: bool = False,
) -> torch.Tensor:
    """Load ``state_dict`` (torchtitan keys, cast to float32) and return float32 logits.

    The forward is the trainer's: positions per token and a flex-attention block mask
    (causal, single document per row) from ``model.get_attention_masks``.
    """
    sd = {k: v.detach().to(torch.float32).clone() for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True)
    bsz, seqlen = tokens.shape
    positions = torch.arange(seqlen).unsqueeze(0).expand(bsz, -1)
    with _flex_attention_mode(compiled_attention):
        masks = model.get_attention_masks(positions=positions)
        out = model(tokens, positions=positions, attention_masks=masks)
    return out.float()


def read_saved_model_weights(step_dir: str | os.PathLike, keys: list[str]) -> dict:
    """Read the model tensors ``keys`` from a DCP step folder, in their saved dtype/shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    sd = {}
    for key in keys:
        md = meta[key]
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{key} is not a tensor in {step_dir}")
        sd[key] = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(sd, checkpoint_id=str(step_dir), no_dist=True)
    return sd


# --------------------------------------------------------------------------------------
# The distributed training job
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class WriterJob:
    dump: str
    variant: str = "debugmodel"
    export_dtype: str = "float32"
    steps: int = 3
    interval: int = 2
    last_save_model_only: bool = True
    seed: int = 0
    lr: float = DEFAULT_LR
    seq_len: int = REFERENCE_SEQ_LEN
    rope_factor: float | None = None
    compiled_attention: bool = False
    verbose: bool = False
    family: str = "llama3"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


class ModelHooks:
    """What differs between the model families this writer trains, as hooks into one training
    job; llama3's (no hook does anything) is the default. Another family's module subclasses
    it (``tests/peers/qwen3_writer.py``) and is named in ``HOOKS``."""

    def __init__(self, job: WriterJob) -> None:
        self.job = job

    def config(self):
        """The torchtitan model config of ``job.variant`` (raises ValueError if unknown)."""
        return model_config(self.job.variant, rope_factor=self.job.rope_factor)

    def dims(self, cfg) -> dict[str, Any]:
        """The model's dimensions for ``model.json``."""
        return model_dims(cfg)

    def after_build(self, model, optimizers, mesh) -> None:
        """Once the sharded model and its optimizers exist (torchtitan's
        ``post_optimizer_build_fn``)."""

    def before_step(self, model, step: int, inputs: dict[str, torch.Tensor]) -> None:
        """Before the optimizer step of training step ``step``."""

    def after_save(self, step: int, checkpointer, last: bool) -> None:
        """After torchtitan saved step ``step`` (collective: every rank calls it)."""


# family -> (module, ModelHooks subclass), imported in the ranks.
HOOKS = {
    "llama3": (__name__, "ModelHooks"),
    "qwen3": ("tests.peers.qwen3_writer", "Qwen3Hooks"),
}


def model_hooks(job: WriterJob) -> ModelHooks:
    module, name = HOOKS[job.family]
    return getattr(importlib.import_module(module), name)(job)


class _TrainState:
    """What torchtitan's Trainer saves as ``train_state``: step and ntokens_seen."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


def _token_stream(vocab_size: int, seq_len: int, seed: int):
    from torch.utils.data import IterableDataset

    class TokenStream(IterableDataset):
        def __iter__(self):
            gen = torch.Generator().manual_seed(seed)
            while True:
                toks = torch.randint(0, vocab_size, (seq_len + 1,), generator=gen)
                yield {"input": toks[:-1]}, toks[1:]

    return TokenStream()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_grad(param, gen: torch.Generator) -> torch.Tensor:
    """A deterministic gradient of the param's global shape, placed like the param."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = torch.randn(tuple(param.shape), generator=gen, dtype=param.dtype) * 0.01
    if isinstance(param, DTensor):
        # Every rank drew the same full tensor, so no data needs to move.
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full


def _full_state_dict(model) -> dict[str, torch.Tensor]:
    """Collective: the model state dict as full plain tensors on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().clone()
    return out


_T0 = time.time()  # per process: the spawned workers import this module afresh


def _log(job: WriterJob, rank: int, msg: str) -> None:
    if job.verbose:
        print(f"[rank {rank} +{time.time() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _exit_rank() -> NoReturn:
    """Ends a rank whose group is destroyed without the interpreter's finalization, which a
    gloo thread still freeing a tensor can turn into "terminate called without an active
    exception" (pytorch/pytorch#117762; the demo writer's ``exit_rank`` says how)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, job: WriterJob, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    if not job.verbose:
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("torchtitan", "root"):
            logging.getLogger(name).setLevel(logging.WARNING)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=600)
    )
    try:
        _train_and_save(rank, job)
    finally:
        dist.destroy_process_group()
    _log(job, rank, "process group destroyed")
    _exit_rank()


def _train_and_save(rank: int, job: WriterJob) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.components.checkpointer import CheckpointManager
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    if not job.verbose:
        from torchtitan.tools.logging import logger as titan_logger

        titan_logger.setLevel(logging.WARNING)

    _log(job, rank, "imports done")
    hooks = model_hooks(job)
    cfg = hooks.config()
    with torch.device("meta"):
        model = cfg.build()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("fsdp",))
    apply_fsdp_to_decoder(
        model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False
    )
    model.to_empty(device="cpu")
    torch.manual_seed(job.seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    opt_cfg = default_adamw(lr=job.lr)
    opt_cfg.implementation = "foreach"  # "fused" is the CUDA default
    optimizers = opt_cfg.build(model_parts=[model])
    hooks.after_build(model, optimizers, mesh)
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(
        optimizers=optimizers, training_steps=job.steps
    )
    dataloader = ParallelAwareDataloader(
        _token_stream(cfg.vocab_size, 16, job.seed + rank),
        dp_rank=rank,
        dp_world_size=WORLD_SIZE,
        batch_size=2,
    )
    train_state = _TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True,
        folder=CHECKPOINT_FOLDER,
        interval=job.interval,
        last_save_model_only=job.last_save_model_only,
        export_dtype=job.export_dtype,
        keep_latest_k=0,
        initial_load_model_only=False,  # True only logs a warning without initial_load_path
    ).build(
        dataloader=dataloader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=job.dump,
    )

    _log(job, rank, "model, optimizer and checkpointer built")
    data_iter = iter(dataloader)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(1, job.steps + 1):
        inputs, _labels = next(data_iter)
        train_state.ntokens_seen += inputs["input"].numel() * WORLD_SIZE
        hooks.before_step(model, step, inputs)
        gen = torch.Generator().manual_seed(1000 * job.seed + step)
        for param in model.parameters():  # parameters() lists a tied weight once
            param.grad = _fake_grad(param, gen)
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        train_state.step = step
        last = step == job.steps
        saved = checkpointer.save(step, last_step=last)
        if saved:
            snapshots[step] = _full_state_dict(model)
            hooks.after_save(step, checkpointer, last)
        _log(job, rank, f"step {step} done (saved: {saved})")
    checkpointer.close()
    dist.barrier()

    _write_reference(rank, job, cfg, hooks.dims(cfg), snapshots)
    _log(job, rank, "reference written")
    dist.barrier()


def _write_reference(
    rank: int, job: WriterJob, cfg, dims: dict[str, Any], snapshots: dict[int, dict]
) -> None:
    """Check the saved weights and compute reference logits; both ranks share the forwards."""
    import torch.distributed as dist

    dump = Path(job.dump)
    tokens = reference_tokens(cfg.vocab_size, job.seq_len)
    export_dtype = getattr(torch, job.export_dtype)
    steps_info: dict[str, dict[str, Any]] = {}
    tasks = []  # (step name, logits name, step)
    for step in sorted(snapshots):
        model_only = step == job.steps and job.last_save_model_only
        saved_dtype = export_dtype if model_only else torch.float32
        name = f"step-{step}"
        steps_info[name] = {
            "step": step,
            "kind": "model_only" if model_only else "full",
            "saved_dtype": str(saved_dtype).removeprefix("torch."),
        }
        tasks.append((name, "logits", step))
        if saved_dtype != torch.float32:
            tasks.append((name, "logits_saved", step))

    model = build_unsharded(cfg)
    mine: dict[tuple[str, str], torch.Tensor] = {}
    checked: set[int] = set()
    for i, (name, what, step) in enumerate(tasks):
        if i % WORLD_SIZE != rank:
            continue
        master = snapshots[step]
        weights = master
        if what == "logits_saved" or step not in checked:
            saved_dtype = getattr(torch, steps_info[name]["saved_dtype"])
            saved = read_saved_model_weights(dump / CHECKPOINT_FOLDER / name, sorted(master))
            for key, value in saved.items():
                if value.dtype != saved_dtype or not torch.equal(
                    value, master[key].to(value.dtype)
                ):
                    raise AssertionError(f"{name}: saved {key} differs from the trained weight")
            checked.add(step)
            if what == "logits_saved":
                weights = saved
        mine[(name, what)] = titan_logits(model, weights, tokens, job.compiled_attention)

    gathered: list[Any] = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return
    for part in gathered:
        for (name, what), logits in part.items():
            steps_info[name][what] = logits
    for info in steps_info.values():
        # A float32 save holds the training weights bit for bit (checked above).
        info.setdefault("logits_saved", info["logits"])
    reference = {
        "tokens": tokens,
        "attention": "flex (compiled)" if job.compiled_attention else "flex (eager)",
        "steps": steps_info,
    }
    torch.save(reference, dump / "reference.pt")

    import torchtitan

    info = {
        "family": job.family,
        "variant": job.variant,
        **dims,
        "torchtitan_version": getattr(torchtitan, "__version__", "unknown"),
        "export_dtype": job.export_dtype,
        "checkpoint_folder": CHECKPOINT_FOLDER,
        "steps": {
            name: {"kind": v["kind"], "saved_dtype": v["saved_dtype"]}
            for name, v in steps_info.items()
        },
        "last_step": job.steps,
    }
    (dump / "model.json").write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def write_checkpoints(
    dump: str | os.PathLike,
    variant: str = "debugmodel",
    export_dtype: str = "float32",
    steps: int = 3,
    interval: int = 2,
    last_save_model_only: bool = True,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    seq_len: int = REFERENCE_SEQ_LEN,
    rope_factor: float | None = None,
    compiled_attention: bool = False,
    verbose: bool = False,
    family: str = "llama3",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps on two gloo CPU ranks and save as torchtitan does.

    Returns the parsed ``model.json`` with ``dump``, ``reference`` (path) and
    ``step_dirs`` ({"step-N": path}) added. ``dump`` is created if missing and must not
    already hold a ``checkpoint`` folder (torchtitan would resume from it).
    """
    import torch.multiprocessing as mp

    if export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown export dtype {export_dtype!r}; choose from {EXPORT_DTYPES}")
    if steps < 1 or interval < 1:
        raise ValueError("steps and interval must be at least 1")
    dump = Path(dump).resolve()
    if (dump / CHECKPOINT_FOLDER).exists():
        raise FileExistsError(f"{dump / CHECKPOINT_FOLDER} exists already")
    dump.mkdir(parents=True, exist_ok=True)
    job = WriterJob(
        dump=str(dump),
        variant=variant,
        export_dtype=export_dtype,
        steps=steps,
        interval=interval,
        last_save_model_only=last_save_model_only,
        seed=seed,
        lr=lr,
        seq_len=seq_len,
        rope_factor=rope_factor,
        compiled_attention=compiled_attention,
        verbose=verbose,
        family=family,
        options=dict(options or {}),
    )
    model_hooks(job).config()  # an unknown variant fails here, not in the ranks
    mp.spawn(_worker, args=(job, _free_port()), nprocs=WORLD_SIZE, join=True)
    info = json.loads((dump / "model.json").read_text())
    info["dump"] = str(dump)
    info["reference"] = str(dump / "reference.pt")
    info["step_dirs"] = {name: str(dump / CHECKPOINT_FOLDER / name) for name in info["steps"]}
    return info


def load_reference(dump: str | os.PathLike) -> dict[str, Any]:
    """``reference.pt`` of a dump: {"tokens", "attention", "steps": {"step-N": {...}}}.

    Each step entry has ``step``, ``kind`` ("full" | "model_only"), ``saved_dtype``,
    ``logits`` (float32 logits of the float32 training weights) and ``logits_saved``
    (float32 compute on the weights as saved, e.g. bfloat16-rounded).
    """
    return torch.load(Path(dump) / "reference.pt", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", help="output folder (the torchtitan dump folder)")
    parser.add_argument("--variant", choices=VARIANTS, default="debugmodel")
    parser.add_argument("--export-dtype", choices=EXPORT_DTYPES, default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument(
        "--last-save-full",
        action="store_true",
        help="save the last step as a full checkpoint (last_save_model_only=False)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--seq-len", type=int, default=REFERENCE_SEQ_LEN)
    parser.add_argument("--rope-factor", type=float, default=None)
    parser.add_argument("--compiled-attention", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    info = write_checkpoints(
        args.dump,
        variant=args.variant,
        export_dtype=args.export_dtype,
        steps=args.steps,
        interval=args.interval,
        last_save_model_only=not args.last_save_full,
        seed=args.seed,
        lr=args.lr,
        seq_len=args.seq_len,
        rope_factor=args.rope_factor,
        compiled_attention=args.compiled_attention,
        verbose=args.verbose,
    )
    for name, path in info["step_dirs"].items():
        print(f"{name}: {info['steps'][name]['kind']} {info['steps'][name]['saved_dtype']} {path}")
    print(f"reference: {info['reference']}")
    print(f"done in {time.monotonic() - begin:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
