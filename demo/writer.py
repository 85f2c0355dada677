"""Write real torchtitan-layout DCP checkpoints, for tests and for the demo.

The converter must cope with checkpoints that torchtitan really wrote, so this module does not
forge the files: it starts ``world_size`` processes on the gloo backend, shards a llama-shaped
``nn.Module`` with FSDP2 (``fully_shard`` over a ``"cpu"`` device mesh), takes real AdamW steps
for resumable ("full") checkpoints, and saves with ``torch.distributed.checkpoint.save``. The
model entries are DTensors, so their chunks really are spread over ``__<rank>_0.distcp`` files.

It is written apart from the converter on purpose: it witnesses the layouts independently, from
torchtitan's history (the commits and PRs cited below), so a test that
compares the converter's output with what :func:`write_step` returns checks both against the spec.

``python -m demo`` writes the demo's checkpoints with it; the tests write theirs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as torch_mp
from torch import nn

KINDS = ("full", "weights_only")


@dataclass(frozen=True)
class SavedLayout:
    """How torchtitan's CheckpointManager laid out a llama3 state dict from one PR on (the
    converter's ``converter/models/llama3.py`` holds the same eras as key tables; this writes
    them with a real module and a real DCP save, from the history cited here)."""

    name: str  # the torchtitan PR (or version) that introduced it
    # Before torchtitan 7d5f3cc69 (#1347, "Always flatten model state_dict", 2025-07-03) the
    # model was nested under "model", with the persistent freqs_cis buffer; the train state was
    # torchtitan 031f73f8a's (an int32 step and torch.save'd BytesIO logs).
    nested: bool
    # "meta": attention.wq|wk|wv; "qkv_linear": attention.qkv_linear.wq|wk|wv (#2878,
    # ad7a86533, 2026-04-16); "fused": one attention.qkv_linear.wqkv (#2878 with fuse_qkv=True);
    # "fused_split_on_save": the fused parameter, saved split by state-dict hooks (#3656,
    # 70dd94551, 2026-06-19), so the optimizer is keyed by wqkv and the model by wq|wk|wv.
    qkv: str
    # "output" until #2937 (786e26f8e, "ChunkedCELoss", 2026-04-27) renamed it "lm_head".
    head: str
    # torchtitan 632f67f12 (2026-06-04) saves only last_epoch for the LR schedulers.
    lr_last_epoch_only: bool = False


LAYOUTS = {
    layout.name: layout
    for layout in (
        SavedLayout("v0.1.0", nested=True, qkv="meta", head="output"),
        SavedLayout("#1347", nested=False, qkv="meta", head="output"),
        SavedLayout("#2878", nested=False, qkv="qkv_linear", head="output"),
        SavedLayout("#2878 fuse_qkv", nested=False, qkv="fused", head="output"),
        SavedLayout("#2937 fuse_qkv", nested=False, qkv="fused", head="lm_head"),
        # torchtitan 0.3.0
        SavedLayout(
            "#2937", nested=False, qkv="fused_split_on_save", head="lm_head",
            lr_last_epoch_only=True,
        ),
    )
}  # fmt: skip
TORCHTITAN_0_3 = "#2937"

# AdamW(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) behind a linear-warmup LambdaLR as in
# torchtitan, but with a large lr and a 2-step warmup instead of 8e-4 over 200 steps: the few
# fake steps must move every weight by more than bfloat16 rounding, so a test can tell a
# trained checkpoint from the initial weights even after export. llama3 rope_theta 500000.
_LR = 1e-2
_WARMUP_STEPS = 2
_ROPE_THETA = 500000.0
# Nested saves kept ``freqs_cis`` as a persistent buffer of shape [max_seq_len, head_dim // 2];
# 2048 is the llama3 default max_seq_len of that period (torchtitan 031f73f8a,
# models/llama/model.py).
_NESTED_MAX_SEQ_LEN = 2048
_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a llama3-style model: enough to lay out every era's keys."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


# (step, kind, export dtype) of one save.
StepKind = tuple[int, str, torch.dtype]
# --------------------------------------------------------------------------------------------
# Reference weights and the Meta <-> layout key mapping
# --------------------------------------------------------------------------------------------


def meta_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Meta-style keys and sizes, in a fixed order so seeded generation is reproducible."""
    hd, d = shape.head_dim, shape.dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (shape.vocab_size, d)}
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = (shape.n_heads * hd, d)
        out[p + "attention.wk.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "attention.wv.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "attention.wo.weight"] = (d, shape.n_heads * hd)
        out[p + "feed_forward.w1.weight"] = (shape.hidden_dim, d)
        out[p + "feed_forward.w2.weight"] = (d, shape.hidden_dim)
        out[p + "feed_forward.w3.weight"] = (shape.hidden_dim, d)
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    out["output.weight"] = (shape.vocab_size, d)
    return out


def reference_weights(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights with Meta-style keys.

    Keys: tok_embeddings.weight, layers.<i>.attention.{wq,wk,wv,wo}.weight,
    layers.<i>.attention_norm.weight, layers.<i>.ffn_norm.weight,
    layers.<i>.feed_forward.{w1,w2,w3}.weight, norm.weight, output.weight (the same tensor as
    tok_embeddings.weight when tied). Norm weights are random around 1, not all ones, so a test
    can tell them apart and catch a converter that mixes them up.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, size in meta_shapes(shape).items():
        if key == "output.weight" and shape.tied_embeddings:
            out[key] = out["tok_embeddings.weight"]
        elif len(size) == 1:
            out[key] = 1.0 + 0.1 * torch.randn(size, generator=gen)
        else:
            out[key] = torch.randn(size, generator=gen).mul_(0.02)
    return out


def _fuse_qkv(
    wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, shape: ModelShape
) -> torch.Tensor:
    """The fused layout: rows grouped per kv head as [n_kv, heads_per_kv + 2, head_dim, dim].

    Each group holds its query heads, then its key head, then its value head (torchtitan
    ad7a86533, "Fused QKV GQAttention implementation", 2026-04-16).
    """
    kv, r, hd, d = shape.n_kv_heads, shape.heads_per_kv, shape.head_dim, shape.dim
    parts = (wq.reshape(kv, r, hd, d), wk.reshape(kv, 1, hd, d), wv.reshape(kv, 1, hd, d))
    return torch.cat(parts, dim=1).reshape(-1, d)


def _split_qkv(
    wqkv: torch.Tensor, shape: ModelShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_fuse_qkv`; also works on Replicate DTensors (the #3656 save hook)."""
    kv, r, hd = shape.n_kv_heads, shape.heads_per_kv, shape.head_dim
    grouped = wqkv.reshape(kv, r + 2, hd, wqkv.shape[-1])
    q, k, v = torch.split(grouped, [r, 1, 1], dim=1)
    return tuple(t.reshape(-1, wqkv.shape[-1]).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def _param_names(shape: ModelShape, layout: SavedLayout) -> list[str]:
    """FQNs of the nn.Parameters of the module we build (tied: one name for the shared one)."""
    fused = layout.qkv in ("fused", "fused_split_on_save")
    names = []
    for key in meta_shapes(shape):
        if key == "output.weight":
            if not shape.tied_embeddings:
                names.append(f"{layout.head}.weight")
        elif fused and key.endswith("attention.wq.weight"):
            names.append(key.replace("attention.wq.", "attention.qkv_linear.wqkv."))
        elif fused and key.endswith(("attention.wk.weight", "wv.weight")):
            continue
        elif layout.qkv == "qkv_linear" and ".attention.w" in key and not key.endswith("wo.weight"):
            names.append(key.replace(".attention.", ".attention.qkv_linear."))
        else:
            names.append(key)
    return names


def _full_param(weights: dict[str, torch.Tensor], name: str, shape: ModelShape) -> torch.Tensor:
    """Full-size value of one module parameter, built from Meta-keyed weights."""
    if name.endswith("qkv_linear.wqkv.weight"):
        p = name.removesuffix("qkv_linear.wqkv.weight")
        return _fuse_qkv(
            weights[p + "wq.weight"], weights[p + "wk.weight"], weights[p + "wv.weight"], shape
        )
    if name == "lm_head.weight":
        return weights["output.weight"]
    return weights[name.replace(".qkv_linear.", ".")]


def _params_to_meta(params: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Module parameters (any layout) back to Meta-style keys, in meta_shapes order."""
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in params.items():
        if name.endswith("qkv_linear.wqkv.weight"):
            p = name.removesuffix("qkv_linear.wqkv.weight")
            wq, wk, wv = _split_qkv(tensor, shape)
            flat.update({p + "wq.weight": wq, p + "wk.weight": wk, p + "wv.weight": wv})
        elif name == "lm_head.weight":
            flat["output.weight"] = tensor
        else:
            flat[name.replace(".qkv_linear.", ".")] = tensor
    if shape.tied_embeddings:
        flat["output.weight"] = flat["tok_embeddings.weight"]
    return {key: flat[key] for key in meta_shapes(shape)}


# --------------------------------------------------------------------------------------------
# The llama-shaped module whose parameter FQNs are the layout's keys
# --------------------------------------------------------------------------------------------


class _FusedQKV(nn.Module):
    """``attention.qkv_linear`` with ``fuse_qkv=True``: one fused ``wqkv`` parameter.

    Saved as is until torchtitan 70dd94551 (#3656, "FusedQKVLinear checkpoint interop via
    state_dict hooks", 2026-06-19; fused by default since 3396a4b37, 2026-06-24; torchtitan
    0.3.0): from then on the optimizer state is keyed by ``wqkv``, but a state-dict post hook
    gathers it to a Replicate DTensor and emits ``wq``/``wk``/``wv``.
    """

    def __init__(self, shape: ModelShape, split_on_save: bool) -> None:
        super().__init__()
        self.shape = shape
        rows = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
        self.wqkv = nn.Linear(shape.dim, rows, bias=False)
        if split_on_save:
            self.register_state_dict_post_hook(_split_wqkv_on_save)


def _split_wqkv_on_save(
    module: _FusedQKV, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    from torch.distributed.tensor import DTensor, Replicate

    tensor = state_dict.pop(prefix + "wqkv.weight")
    if isinstance(tensor, DTensor):
        # The per-kv-group reshape needs whole rows: gather, as torchtitan 0.3.0 does, so these
        # three keys are saved as replicated (unchunked) tensors, deduplicated to one rank.
        tensor = tensor.redistribute(tensor.device_mesh, [Replicate()] * tensor.device_mesh.ndim)
    wq, wk, wv = _split_qkv(tensor, module.shape)
    state_dict[prefix + "wq.weight"] = wq
    state_dict[prefix + "wk.weight"] = wk
    state_dict[prefix + "wv.weight"] = wv


class _QKV(nn.Module):
    """``attention.qkv_linear`` without a fused QKV (torchtitan ad7a86533, #2878)."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        d, hd = shape.dim, shape.head_dim
        self.wq = nn.Linear(d, shape.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, shape.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, shape.n_kv_heads * hd, bias=False)


class _Attention(nn.Module):
    def __init__(self, shape: ModelShape, layout: SavedLayout) -> None:
        super().__init__()
        d, hd = shape.dim, shape.head_dim
        if layout.qkv == "meta":
            self.wq = nn.Linear(d, shape.n_heads * hd, bias=False)
            self.wk = nn.Linear(d, shape.n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(d, shape.n_kv_heads * hd, bias=False)
        elif layout.qkv == "qkv_linear":
            self.qkv_linear = _QKV(shape)
        else:
            split = layout.qkv == "fused_split_on_save"
            self.qkv_linear = _FusedQKV(shape, split_on_save=split)
        self.wo = nn.Linear(shape.n_heads * hd, d, bias=False)


class _FeedForward(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.w1 = nn.Linear(shape.dim, shape.hidden_dim, bias=False)
        self.w2 = nn.Linear(shape.hidden_dim, shape.dim, bias=False)
        self.w3 = nn.Linear(shape.dim, shape.hidden_dim, bias=False)


class _Block(nn.Module):
    def __init__(self, shape: ModelShape, layout: SavedLayout) -> None:
        super().__init__()
        self.attention = _Attention(shape, layout)
        self.feed_forward = _FeedForward(shape)
        self.attention_norm = nn.RMSNorm(shape.dim, eps=_NORM_EPS)
        self.ffn_norm = nn.RMSNorm(shape.dim, eps=_NORM_EPS)


class _Transformer(nn.Module):
    """No forward: only the parameter tree matters for the state dict."""

    def __init__(self, shape: ModelShape, layout: SavedLayout) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(shape.vocab_size, shape.dim)
        # torchtitan keeps layers in a ModuleDict keyed "0", "1", ... -> FQNs layers.<i>.
        self.layers = nn.ModuleDict({str(i): _Block(shape, layout) for i in range(shape.n_layers)})
        self.norm = nn.RMSNorm(shape.dim, eps=_NORM_EPS)
        head = nn.Linear(shape.dim, shape.vocab_size, bias=False)
        if shape.tied_embeddings:
            head.weight = self.tok_embeddings.weight
        self.add_module(layout.head, head)
        if layout.nested:
            self.register_buffer(
                "freqs_cis",
                torch.empty(_NESTED_MAX_SEQ_LEN, shape.head_dim // 2, dtype=torch.complex64),
                persistent=True,
            )


def model_state_shapes(
    shape: ModelShape, layout: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's keys as a save in ``layout`` names them, with shapes and dtypes (from the
    module built on the meta device: no data, no ranks), nested as a full save of that era
    nests them."""
    saved = LAYOUTS[layout]
    with torch.device("meta"):
        model = _Transformer(shape, saved)
    state = model.state_dict()
    prefix = "model." if saved.nested else ""
    return {prefix + k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def rope_table(shape: ModelShape) -> torch.Tensor:
    """The ``freqs_cis`` a nested save kept: torchtitan's llama3 ``precompute_freqs_cis`` of
    that period (031f73f8a), without the Llama 3.1 scaling that #1839 (5bbda42c7, 2025-10-08)
    added later."""
    hd = shape.head_dim
    inv = 1.0 / (_ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd))
    angles = torch.outer(torch.arange(_NESTED_MAX_SEQ_LEN, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def _warmup(step: int) -> float:
    # Module-level (not a lambda) so LambdaLR.state_dict() stays picklable.
    return min(1.0, (step + 1) / _WARMUP_STEPS)


# --------------------------------------------------------------------------------------------
# The rank worker (spawned; must stay importable at module level)
# --------------------------------------------------------------------------------------------


def _rank_main(rank: int, jobs: list[dict[str, Any]]) -> None:
    """One rank: joins the process group once, then writes every step of ``jobs`` in turn
    (starting the ranks costs more than writing a small checkpoint)."""
    world_size: int = jobs[0]["world_size"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # The rendezvous store is the driver's (see write_steps_from_files), not rank 0's: it
    # outlives every rank, whichever ends first.
    store = dist.TCPStore("127.0.0.1", jobs[0]["port"], is_master=False)
    timeout = timedelta(minutes=30)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        for job in jobs:
            _rank_write(rank, job)
        dist.barrier()  # every rank is done before any tears its process group down
    finally:
        dist.destroy_process_group()
    exit_rank()


def exit_rank() -> NoReturn:
    """Ends a rank whose work is done and whose process group is destroyed, without the
    interpreter's finalization.

    ``destroy_process_group`` leaves gloo's worker threads running, and one that drops the last
    reference to a tensor made in Python takes the GIL to do it (``TensorImpl::decref_pyobject``
    -> ``PyEval_AcquireThread``: DCP's last broadcast, if the run loop thread drops its work
    after the main thread dropped the tensors). A thread that asks for the GIL while the
    interpreter finalizes is ended by CPython 3.11 to 3.13 with ``pthread_exit``, whose unwinding
    through that ``noexcept`` frame calls ``std::terminate``: "terminate called without an
    active exception", SIGABRT, and a failed rank after all of its work was done
    (pytorch/pytorch#117762; CPython gh-87135, where 3.14 hangs such a thread instead).
    ``tests/test_rank_exit.py`` schedules the threads so that it happens every time. Nothing
    is left to finalize: the step folders are written and their files closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_write(rank: int, job: dict[str, Any]) -> None:
    """Build, shard, (train,) save one step, and report its shards and peak RSS to job files."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    world_size: int = job["world_size"]
    shape = ModelShape(**job["shape"])
    layout = LAYOUTS[job["layout"]]
    kind: str = job["kind"]
    work = Path(job["work_dir"])
    mesh = init_device_mesh("cpu", (world_size,))
    with torch.device("meta"):
        model = _Transformer(shape, layout)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")

    params = dict(model.named_parameters())
    if sorted(params) != sorted(_param_names(shape, layout)):
        raise AssertionError(f"unexpected parameter names: {sorted(params)}")
    with torch.no_grad():
        if job["weights_file"] is None:
            _seed_shards(params, rank)
        else:
            weights = torch.load(job["weights_file"], mmap=True, weights_only=True)
            for name, param in params.items():
                full = _full_param(weights, name, shape)
                # src_data_rank=None: every rank slices its own chunk, no communication.
                param.copy_(distribute_tensor(full, mesh, param.placements, src_data_rank=None))
            del weights
        if layout.nested:
            model.freqs_cis.copy_(rope_table(shape))

    step: int = job["step"]
    if kind == "full":
        optim = torch.optim.AdamW(
            model.parameters(), lr=_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
        )
        sched = torch.optim.lr_scheduler.LambdaLR(optim, _warmup)
        for it in range(job["optimizer_steps"]):
            # One parameter at a time, so at most one gradient shard is alive: this keeps
            # the 500M demo's ranks at params + two Adam moments.
            for name, param in params.items():
                assert isinstance(param, DTensor)
                local = param.to_local()
                gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{it}:{rank}".encode()))
                grad = torch.randn(local.shape, generator=gen).mul_(1e-2)
                param.grad = DTensor.from_local(
                    grad, mesh, param.placements, shape=param.shape, stride=param.stride()
                )
                optim.step()
                param.grad = None
            sched.step()
        optim_sd = get_optimizer_state_dict(
            model, optim, options=StateDictOptions(flatten_optimizer_state_dict=True)
        )
        state = _full_state(model.state_dict(), optim_sd, sched, layout, step, rank, job)
    else:
        dtype = getattr(torch, job["export_dtype"])
        state = {k: v.to(dtype) for k, v in model.state_dict().items() if k != "freqs_cis"}

    dcp.save(state, storage_writer=dcp.FileSystemWriter(job["step_dir"], thread_count=1))
    dist.barrier()

    if kind == "full":
        del state, optim_sd, optim, sched
        shards = {n: p.to_local().detach().clone() for n, p in params.items()}
        torch.save(shards, work / f"shards_{rank}.pt")
        del shards
    (work / f"stats_{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def _seed_shards(params: dict[str, torch.Tensor], rank: int) -> None:
    """Each rank fills its own shards with seeded values, with no full copy anywhere: for
    checkpoints too large to hold twice (the benchmark's). Norms near 1, as reference_weights."""
    from torch.distributed.tensor import DTensor

    for name, param in params.items():
        assert isinstance(param, DTensor)
        local = param.to_local()
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{rank}".encode()))
        if local.dim() == 1:
            local.normal_(1.0, 0.1, generator=gen)
        else:
            local.normal_(0.0, 0.02, generator=gen)


def _full_state(
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any],
    sched: torch.optim.lr_scheduler.LRScheduler,
    layout: SavedLayout,
    step: int,
    rank: int,
    job: dict[str, Any],
) -> dict[str, Any]:
    """The resumable state dict of one rank, shaped as torchtitan's CheckpointManager saves it."""
    world_size = job["world_size"]
    # Dataloader: {"dp_rank_<r>": pickled StatefulDataLoader state, "world_size": n}, same in all
    # layouts (torchtitan components/dataloader.py since 2025-02, e.g. 031f73f8a).
    loader_state = {
        "_num_yielded": step,
        "_sampler_iter_yielded": step,
        "_snapshot": {"_snapshot_step": step, "_worker_snapshots": {}},
        "dataset_state": {"sample_idx": step * 8 + rank, "token_buffer": []},
    }
    dataloader = {f"dp_rank_{rank}": pickle.dumps(loader_state), "world_size": world_size}
    if layout.nested:
        # TrainState of torchtitan 031f73f8a (2025-02): int32 step and torch.save'd BytesIO logs.
        logs = {}
        for key, value in (
            ("global_avg_losses", [4.2, 3.9]),
            ("global_max_losses", [5.0, 4.4]),
            ("log_steps", [1, step]),
        ):
            buf = BytesIO()
            torch.save(value, buf)
            logs[key] = buf
        train_state: dict[str, Any] = {"step": torch.tensor(step, dtype=torch.int32), **logs}
    else:
        # Trainer.state_dict() from 2025-07 on: {"step", "ntokens_seen"} as plain ints.
        train_state = {"step": step, "ntokens_seen": step * 8 * 2048 * world_size}
    if layout.lr_last_epoch_only:
        lr_state: dict[str, Any] = {"last_epoch": sched.last_epoch}
    else:
        lr_state = sched.state_dict()
    rest = {
        "optimizer": optim_sd,
        "lr_scheduler": lr_state,
        "dataloader": dataloader,
        "train_state": train_state,
    }
    if layout.nested:
        return {"model": model_sd, **rest}
    # Flat: model keys at top level; freqs_cis non-persistent from 9874e84d1 (2025-08-19) and
    # excluded from saves already since aefe15a32 (2025-06-26).
    return {**{k: v for k, v in model_sd.items() if k != "freqs_cis"}, **rest}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """VmHWM of this process: unlike ru_maxrss it restarts at exec, so a spawned rank does not
    inherit its parent's peak. It counts the pages of the mapped weights file it touched."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prepare_step_dir(step_dir: Path) -> None:
    """Create ``step_dir``; an old DCP save there is replaced, anything else is refused."""
    if step_dir.exists():
        foreign = [
            p.name for p in step_dir.iterdir() if p.name != ".metadata" and p.suffix != ".distcp"
        ]
        if foreign:
            raise FileExistsError(f"{step_dir} holds files that are not a DCP save: {foreign}")
        shutil.rmtree(step_dir)
    step_dir.mkdir(parents=True)


def _step_number(step_dir: Path, default: int) -> int:
    match = re.fullmatch(r"step-(\d+)", step_dir.name)
    return int(match.group(1)) if match else default


def save_weights(weights: dict[str, torch.Tensor], shape: ModelShape, path: Path) -> None:
    """Check Meta-keyed weights against ``shape`` and save them as float32 for the ranks."""
    missing = set(meta_shapes(shape)) - set(weights)
    if missing:
        raise KeyError(f"weights lack {sorted(missing)[:5]} ...")
    for key, size in meta_shapes(shape).items():
        if tuple(weights[key].shape) != size:
            raise ValueError(f"{key}: shape {tuple(weights[key].shape)}, expected {size}")
    if shape.tied_embeddings and not torch.equal(
        weights["output.weight"], weights["tok_embeddings.weight"]
    ):
        raise ValueError("tied_embeddings but output.weight != tok_embeddings.weight")
    tensors = {k: weights[k].float().contiguous() for k in meta_shapes(shape)}
    path.unlink(missing_ok=True)  # a new inode: tensors still mapped from the old file stay valid
    torch.save(tensors, path)


@dataclass(frozen=True)
class StepSpec:
    """One step folder to write: see :func:`write_step` for the fields."""

    step_dir: Path
    weights_file: Path | None  # None: each rank seeds its own shards (see _seed_shards)
    shape: ModelShape
    layout: str
    kind: str
    export_dtype: torch.dtype = torch.float32
    optimizer_steps: int = 2


def rank_jobs(
    specs: Sequence[StepSpec], world_size: int, port: int, work_root: Path
) -> list[dict[str, Any]]:
    """What :func:`_rank_main` is given: one job per step, each with a work folder (under
    ``work_root``) for the files the ranks report back through, and the rendezvous store's
    ``port``. Prepares the step folders."""
    for spec in specs:
        if spec.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {spec.layout!r}")
        if spec.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    jobs = []
    for i, spec in enumerate(specs):
        _prepare_step_dir(Path(spec.step_dir))
        work = work_root / str(i)
        work.mkdir()
        jobs.append(
            {
                "world_size": world_size,
                "shape": {f: getattr(spec.shape, f) for f in ModelShape.__dataclass_fields__},
                "layout": spec.layout,
                "kind": spec.kind,
                "export_dtype": str(spec.export_dtype).removeprefix("torch."),
                "optimizer_steps": spec.optimizer_steps,
                "step": _step_number(Path(spec.step_dir), spec.optimizer_steps),
                "step_dir": str(spec.step_dir),
                "weights_file": spec.weights_file and str(spec.weights_file),
                "work_dir": str(work),
                "port": port,
            }
        )
    return jobs


def write_steps_from_files(
    specs: Sequence[StepSpec], world_size: int
) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """Run the ranks once over steps whose weights :func:`save_weights` wrote; return each
    step's tensors and stats.

    The weights go through a file that each rank maps, so the driver need not keep them in
    memory while the ranks run (the 500M demo would otherwise hold a third copy).
    """
    # The ranks' rendezvous store, hosted here: this process outlives every rank.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="titan2tune-demo-") as tmp:
        jobs = rank_jobs(specs, world_size, store.port, Path(tmp))
        start = time.perf_counter()  # the ranks' time: not an old save's removal
        try:
            torch_mp.start_processes(
                _rank_main, args=(jobs,), nprocs=world_size, join=True, start_method="spawn"
            )
        except (torch_mp.ProcessRaisedException, torch_mp.ProcessExitedException) as exc:
            raise RuntimeError(
                f"demo checkpoint writer: rank {exc.error_index} failed while writing "
                f"{[str(s.step_dir) for s in specs]}; the step folders may be incomplete.\n{exc}"
            ) from exc
        seconds = (time.perf_counter() - start) / len(specs)
        return [
            _collect(spec, Path(job["work_dir"]), world_size, seconds)
            for spec, job in zip(specs, jobs, strict=True)
        ]


def _collect(
    spec: StepSpec, work: Path, world_size: int, seconds: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The tensors one step saved and its ranks' stats, from the ranks' job files."""
    step_dir, shape = Path(spec.step_dir), spec.shape
    if not (step_dir / ".metadata").exists():
        raise RuntimeError(f"demo checkpoint writer: no .metadata in {step_dir}")
    stats = {"seconds": seconds}
    for r in range(world_size):
        stats[f"rank{r}_peak_rss_mib"] = json.loads((work / f"stats_{r}.json").read_text())[
            "peak_rss_mib"
        ]
    if spec.kind == "full":
        # The trained values come from the ranks' own parameter shards (FSDP2 shards dim 0
        # in rank order), not from reading the checkpoint back.
        shards = [
            torch.load(work / f"shards_{r}.pt", mmap=True, weights_only=True)
            for r in range(world_size)
        ]
        params = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
        del shards
        return _params_to_meta(params, shape), stats
    if spec.weights_file is None:
        return {}, stats
    weights = torch.load(spec.weights_file, mmap=True, weights_only=True)
    # copy=True: do not hand back tensors backed by a temporary mapped file.
    result = {k: weights[k].to(spec.export_dtype, copy=True) for k in meta_shapes(shape)}
    if shape.tied_embeddings:
        result["output.weight"] = result["tok_embeddings.weight"]
    return result, stats


def write_steps(
    steps: Sequence[tuple[Path, dict[str, torch.Tensor], ModelShape, dict[str, Any]]],
    world_size: int = 2,
) -> list[dict[str, torch.Tensor]]:
    """:func:`write_step` for many steps with one start of the ranks: each item is
    ``(step_dir, weights, shape, {"layout": ..., "kind": ..., ...})``."""
    with tempfile.TemporaryDirectory(prefix="titan2tune-weights-") as tmp:
        specs = []
        for i, (step_dir, weights, shape, options) in enumerate(steps):
            weights_file = Path(tmp) / f"weights_{i}.pt"
            save_weights(weights, shape, weights_file)
            specs.append(StepSpec(Path(step_dir), weights_file, shape, **options))
        return [tensors for tensors, _ in write_steps_from_files(specs, world_size)]


def write_step(
    step_dir: Path,
    weights: dict[str, torch.Tensor],
    shape: ModelShape,
    *,
    layout: str,
    kind: str,
    export_dtype: torch.dtype = torch.float32,
    world_size: int = 2,
    optimizer_steps: int = 2,
) -> dict[str, torch.Tensor]:
    """Write one torchtitan step folder (e.g. ``.../checkpoint/step-20``) with a real DCP save.

    ``layout`` is one of LAYOUTS, ``kind`` is "full" (resumable:
    model, optimizer, lr_scheduler, dataloader, train_state, float32, after ``optimizer_steps``
    AdamW steps on seeded fake gradients) or "weights_only" (model keys alone, flat, cast to
    ``export_dtype``). ``train_state.step`` is N from a ``step-N`` folder name.

    Returns the Meta-style-keyed full tensors exactly as saved, so a test can compare a
    converter's output with them without trusting DCP or the converter.
    """
    options = {
        "layout": layout,
        "kind": kind,
        "export_dtype": export_dtype,
        "optimizer_steps": optimizer_steps,
    }
    return write_steps([(step_dir, weights, shape, options)], world_size)[0]
