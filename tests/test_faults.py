"""Bad input and faults: every case fails with a short error that names the file or key at fault
and says what to do, with no traceback unless asked for, and changes nothing on disk: no output,
no partial, no lock file, no new folder, and the source checkpoint byte for byte as it was.

Each case runs ``python convert.py`` for real, in a subprocess, on a damaged copy of a real
two-rank FSDP2 DCP save. Starting the interpreter and torch costs seconds, so the table cases
run side by side; the kill, race and resource cases run on their own on a larger checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from converter.errors import ConversionError
from converter.filler import Filler
from converter.formats import FORMATS
from converter.plan import OutputTensor
from converter.publish import Output
from demo import writer as demo
from tests.conftest import REPO, model_overrides, unavailable

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

# A fused QKV (torchtitan#2937 with fuse_qkv=True, so head counts can contradict the shapes),
# grouped-query attention.
SMALL = demo.ModelShape(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=160)
# ~580 MB of float32: larger than the memory cgroup below, and slow enough to write that a
# conversion can be killed, or raced, while it writes.
BIG = demo.ModelShape(
    dim=1024, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=32768, hidden_dim=2816
)
STEP = 10
OUT = ("model.pt", "model.pt.manifest.json", "model.pt.torchtune.yaml")
# A tensor whose bytes the corruption cases overwrite; its name is the same in the output.
VICTIM = "layers.1.feed_forward.w2.weight"
CONCURRENT_RUNS = 4
RUN_TIMEOUT = 300  # seconds, for one run of the table; they take 5 to 40


# --------------------------------------------------------------------------------------------
# Checkpoints: written once per module, copied for each case that damages one
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], Path, dict[str, torch.Tensor]]:
    """Both checkpoints, by one start of the ranks: a full (resumable) fused-QKV save at step 10
    and a float32 weights-only save in torchtitan 0.3.0's layout. Returns (small step folder,
    its weights, big checkpoint folder, its weights)."""
    small_step = tmp_path_factory.mktemp("pristine_small") / "checkpoint" / f"step-{STEP}"
    big_root = tmp_path_factory.mktemp("pristine_big") / "checkpoint"
    small_weights, big_weights = demo.write_steps(
        [
            (
                small_step, demo.reference_weights(SMALL, seed=11), SMALL,
                {"layout": "#2937 fuse_qkv", "kind": "full"},
            ),
            (
                big_root / "step-1", demo.reference_weights(BIG, seed=12), BIG,
                {"layout": "#2937", "kind": "weights_only", "export_dtype": torch.float32},
            ),
        ]
    )  # fmt: skip
    return small_step, small_weights, big_root, big_weights


@pytest.fixture(scope="module")
def small(saves) -> tuple[Path, dict[str, torch.Tensor]]:
    """The small checkpoint's step folder and the weights it holds."""
    return saves[0], saves[1]


@pytest.fixture(scope="module")
def big(saves) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The big checkpoint folder, its weights, and the sha256 of each of its files."""
    return saves[2], saves[3], snapshot(saves[2])


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: sha256 of files, link targets, and folders."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        elif path.is_fifo():
            found[rel] = "fifo"
        else:
            with open(path, "rb") as f:
                found[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return found


def command(overrides: dict[str, str], hydra_dir: Path) -> list[str]:
    args = {"experiment": "debug", "hydra.run.dir": str(hydra_dir), **overrides}
    return [sys.executable, "convert.py", *(f"{k}={v}" for k, v in args.items())]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: as ours, without a HYDRA_FULL_ERROR the CI might set."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, **(extra or {})}


def small_overrides(root: Path) -> dict[str, str]:
    """A run of the small checkpoint copied to ``root/checkpoint``, output to ``root/out``."""
    model = dict(o.split("=", 1) for o in model_overrides(SMALL))
    return {
        "experiment.checkpoint_dir": str(root / "checkpoint"),
        "experiment.output": str(root / "out" / "model.pt"),
        **model,
    }


def big_overrides(checkpoint: Path, output: Path, **more: str) -> dict[str, str]:
    model = dict(o.split("=", 1) for o in model_overrides(BIG))
    return {
        "experiment.checkpoint_dir": str(checkpoint),
        "experiment.output": str(output),
        **model,
        **more,
    }


def assert_matches(output: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The output loads as torchtune loads it and holds exactly the weights, cast."""
    loaded = torch.load(output, mmap=True, weights_only=True)
    assert sorted(loaded) == sorted(weights)
    for key, tensor in weights.items():
        assert torch.equal(loaded[key], tensor.to(dtype)), key


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "[ERROR]" in line or "Error" in line]
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------------
# Damage, each to a fresh copy of the small checkpoint under ``root``
# --------------------------------------------------------------------------------------------


def copy_small(root: Path, pristine: Path, name: str = f"step-{STEP}") -> Path:
    step_dir = root / "checkpoint" / name
    shutil.copytree(pristine, step_dir)
    return step_dir


def read_index(step_dir: Path) -> Metadata:
    with open(step_dir / ".metadata", "rb") as f:
        return pickle.load(f)


def overwrite_tensor_bytes(
    step_dir: Path, key: str, value: bytes, chunk_index: int = 0, at: int = 0
) -> None:
    """Overwrites stored values of ``key`` in place, from byte ``at`` of its chunk
    ``chunk_index`` on, leaving the blob's structure intact, as a bit flip or a stray write
    would: only a value check can notice."""
    index = read_index(step_dir)
    chunk = index.state_dict_metadata[key].chunks[chunk_index]
    info = index.storage_data[MetadataIndex(key, chunk.offsets)]
    path = step_dir / info.relative_path
    with open(path, "r+b") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
        stored = torch.load(io.BytesIO(blob), weights_only=True)
        found = blob.find(stored.contiguous().view(torch.uint8).numpy().tobytes())
        assert found > 0, f"the bytes of {key} not found in their blob"
        assert at + len(value) <= stored.nbytes, f"{key}'s chunk ends before byte {at}"
        f.seek(info.offset + found + at)
        f.write(value)


def add_keys(step_dir: Path, keys: list[str], like: str) -> None:
    """Adds index entries for ``keys`` (pointing at ``like``'s data) to ``.metadata``."""
    index = read_index(step_dir)
    entry = index.state_dict_metadata[like]
    for key in keys:
        index.state_dict_metadata[key] = entry
        for chunk in entry.chunks:
            index.storage_data[MetadataIndex(key, chunk.offsets)] = index.storage_data[
                MetadataIndex(like, chunk.offsets)
            ]
    (step_dir / ".metadata").write_bytes(pickle.dumps(index))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small file system of our own, to fill up or to refuse writes even to root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode:
        unavailable(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {run.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def hold_lock(lock_file: Path, stack: ExitStack) -> None:
    """Holds the output's lock as a running conversion does."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    stack.callback(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


Prepare = Callable[[Path, Path, ExitStack], dict[str, str]]


@dataclass(frozen=True)
class Case:
    """One way to run the converter wrongly or on damaged input, and what the run must say.

    ``prepare(root, pristine_step_dir, cleanup)`` lays out the case under ``root`` and returns
    the command-line overrides. Unless ``ok``, the run must exit non-zero with every fragment
    of ``expect`` on stderr, none of ``absent``, and change nothing under ``root``.
    """

    prepare: Prepare
    expect: tuple[str, ...]
    ok: bool = False
    traceback: bool = False
    env: dict[str, str] = field(default_factory=dict)
    prlimit: tuple[str, ...] = ()  # e.g. "--fsize=65536" for the run
    check: Callable[[Path, dict[str, torch.Tensor]], None] | None = None
    absent: tuple[str, ...] = ()  # advice the run must not give


def _copy(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    copy_small(root, pristine)
    return small_overrides(root)


def _missing_folder(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    return {**small_overrides(root), "experiment.checkpoint_dir": str(root / "no_such_folder")}


def _missing_folder_debug(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    return {**_missing_folder(root, pristine, cleanup), "debug": "true"}


def _empty_folder(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    (root / "checkpoint").mkdir()
    return small_overrides(root)


def _not_dcp(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A Hugging Face export where a torchtitan checkpoint folder was expected."""
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "config.json").write_text("{}")
    (root / "checkpoint" / "model.safetensors").write_bytes(b"\0" * 64)
    return small_overrides(root)


def _step_missing(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    copy_small(root, pristine)
    copy_small(root, pristine, "step-20")
    return {**small_overrides(root), "experiment.step": "7"}


def _step_named_twice(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """step-010 beside step-10 (a copy by hand): both are step 10."""
    copy_small(root, pristine)
    copy_small(root, pristine, "step-010")
    return small_overrides(root)


def _latest_unfinished(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """step-20 has its shards but no ``.metadata``: the save was cut short."""
    copy_small(root, pristine)
    (copy_small(root, pristine, "step-20") / ".metadata").unlink()
    return {**small_overrides(root), "experiment.step": "latest"}


def _check_latest(root: Path, weights: dict[str, torch.Tensor]) -> None:
    """It converted step-10; the manifest holds each source file's size and mtime, and the
    XXH3-128 of every model tensor's bytes as saved, each read here with DCP's own loader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _check_small(root, weights)
    manifest = json.loads((root / "out" / "model.pt.manifest.json").read_text())
    assert manifest["source"]["step"] == STEP
    step_dir = root / "checkpoint" / f"step-{STEP}"
    files = {p.name: p for p in step_dir.iterdir()}
    assert set(manifest["source"]["files"]) == set(files) == {".metadata", *_shards(step_dir)}
    for name, recorded in manifest["source"]["files"].items():
        st = files[name].stat()
        assert recorded == {"bytes": st.st_size, "mtime_ns": str(st.st_mtime_ns)}, name
    dcp_to_torch_save(step_dir, root / "whole.pt")
    saved = torch.load(root / "whole.pt", weights_only=True)
    tensors = manifest["source"]["tensors"]
    assert set(tensors) == {k for k in saved if not k.startswith(_TRAINING_STATE)}
    for key, recorded in tensors.items():
        data = saved[key].contiguous().view(torch.uint8).numpy()
        assert recorded == {"bytes": data.nbytes, "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    assert manifest["source"]["bytes_read"] == sum(t["bytes"] for t in tensors.values())


_TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def _shards(step_dir: Path) -> list[str]:
    return [p.name for p in step_dir.glob("*.distcp")]


def _metadata_truncated(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    truncate(copy_small(root, pristine) / ".metadata")
    return small_overrides(root)


def _metadata_garbage(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    (copy_small(root, pristine) / ".metadata").write_bytes(b"this is not a pickle\n" * 50)
    return small_overrides(root)


def _metadata_fifo(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A named pipe where .metadata should be: opened plainly, it waits for a writer forever."""
    step = copy_small(root, pristine)
    (step / ".metadata").unlink()
    os.mkfifo(step / ".metadata")
    return small_overrides(root)


def _metadata_unknown(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A well-formed pickle, but not a DCP index (as a future format might be)."""
    index = {"format": "dcp-v9", "state_dict_metadata": []}
    (copy_small(root, pristine) / ".metadata").write_bytes(pickle.dumps(index))
    return small_overrides(root)


def _shard_missing(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    (copy_small(root, pristine) / "__1_0.distcp").unlink()
    return small_overrides(root)


def _shard_truncated(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    truncate(copy_small(root, pristine) / "__1_0.distcp")
    return small_overrides(root)


def _shard_overwritten(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """16 float32 values of VICTIM become all-ones bit patterns: NaN."""
    overwrite_tensor_bytes(copy_small(root, pristine), VICTIM, b"\xff" * 64)
    return small_overrides(root)


def _shard_overwritten_allowed(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    return {**_shard_overwritten(root, pristine, cleanup), "allow_nonfinite": "true"}


def _check_nan_written(root: Path, weights: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(OUT)
    loaded = torch.load(root / "out" / "model.pt", mmap=True, weights_only=True)
    assert int(torch.isnan(loaded[VICTIM]).sum()) == 16
    assert all(torch.isfinite(t).all() for k, t in loaded.items() if k != VICTIM)
    manifest = json.loads((root / "out" / "model.pt.manifest.json").read_text())
    assert manifest["nonfinite"] == {VICTIM: 16} and manifest["underflowed_to_zero"] == {}


TINY_VALUES = torch.full((4,), 1e-9, dtype=torch.float32)  # float16 rounds below 3e-8 to 0


def _below_float16(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """Four non-zero float32 values (1e-9) that float16 rounds to 0, exported as float16."""
    overwrite_tensor_bytes(copy_small(root, pristine), VICTIM, TINY_VALUES.numpy().tobytes())
    return {**small_overrides(root), "experiment.export_dtype": "float16"}


def _check_underflows_counted(root: Path, weights: dict[str, torch.Tensor]) -> None:
    """The manifest counts, per tensor, every non-zero source value written as 0: the four
    set, and any of the saved weights' own that float16 cannot hold either."""
    source = dict(weights)
    victim = source[VICTIM].flatten().clone()
    victim[: len(TINY_VALUES)] = TINY_VALUES  # the chunk's first bytes: the tensor's first rows
    source[VICTIM] = victim
    expected = {k: int(((w != 0) & (w.half() == 0)).sum()) for k, w in source.items()}
    manifest = json.loads((root / "out" / "model.pt.manifest.json").read_text())
    assert manifest["underflowed_to_zero"] == {k: n for k, n in expected.items() if n}
    assert manifest["underflowed_to_zero"][VICTIM] >= len(TINY_VALUES)
    assert manifest["nonfinite"] == {}


def _unknown_keys(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A vision tower and a q-norm: keys of a model family the layouts do not describe."""
    step_dir = copy_small(root, pristine)
    add_keys(step_dir, ["vision_tower.proj.weight", "layers.0.attention.q_norm.weight"], VICTIM)
    return small_overrides(root)


def _heads_contradict(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """96 fused rows cannot be 6 query heads and 2 kv heads of equal size."""
    copy_small(root, pristine)
    return {
        **small_overrides(root),
        "experiment.model.n_heads": "6",
        "experiment.model.n_kv_heads": "2",
    }


def _output_folder_missing(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    copy_small(root, pristine)
    return {**small_overrides(root), "experiment.output": str(root / "out" / "a" / "model.pt")}


def _check_output_folder_made(root: Path, weights: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in (root / "out" / "a").iterdir()) == sorted(OUT)
    assert_matches(root / "out" / "a" / "model.pt", weights, torch.bfloat16)


def _output_read_only(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A read-only file system: even root cannot write there."""
    copy_small(root, pristine)
    cleanup.enter_context(tmpfs(root / "out", "1m", read_only=True))
    return small_overrides(root)


def _disk_full(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """96 KiB of room for a 190 KiB output."""
    copy_small(root, pristine)
    cleanup.enter_context(tmpfs(root / "out", "96k"))
    return small_overrides(root)


def _output_is_source(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """``model.pt`` is a link to a shard file of the checkpoint being converted."""
    step_dir = copy_small(root, pristine)
    (root / "out").mkdir()
    (root / "out" / "model.pt").symlink_to(step_dir / "__0_0.distcp")
    return small_overrides(root)


def _output_in_step_folder(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    step_dir = copy_small(root, pristine)
    return {**small_overrides(root), "experiment.output": str(step_dir / "model.pt")}


def _output_is_a_folder(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """``model.pt`` is by mistake an existing folder, with a file in it."""
    copy_small(root, pristine)
    (root / "out" / "model.pt").mkdir(parents=True)
    (root / "out" / "model.pt" / "notes.txt").write_text("keep me\n")
    return small_overrides(root)


def _sidecar_is_a_folder(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A folder takes the manifest's name: writing the manifest would fail."""
    copy_small(root, pristine)
    (root / "out" / "model.pt.manifest.json").mkdir(parents=True)
    (root / "out" / "model.pt.manifest.json" / "notes.txt").write_text("keep me\n")
    return small_overrides(root)


def _output_locked(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """Another conversion to the same output holds its lock."""
    copy_small(root, pristine)
    hold_lock(root / "out" / ".model.pt.lock", cleanup)
    return small_overrides(root)


def remove_keys(step_dir: Path, prefix: str) -> None:
    """Drops every index entry whose key starts with ``prefix`` from ``.metadata`` (the shard
    bytes stay): a save that lacks those tensors."""
    index = read_index(step_dir)
    for key in [k for k in index.state_dict_metadata if k.startswith(prefix)]:
        del index.state_dict_metadata[key]
    index.storage_data = {
        k: v for k, v in index.storage_data.items() if not k.fqn.startswith(prefix)
    }
    (step_dir / ".metadata").write_bytes(pickle.dumps(index))


def _lacks_a_layer(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """The index has lost layer 1's feed-forward weights."""
    remove_keys(copy_small(root, pristine), "layers.1.feed_forward.")
    return small_overrides(root)


def _unfinished_step_asked_for(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    return {**_latest_unfinished(root, pristine, cleanup), "experiment.step": "20"}


def _checkpoint_dir_is_a_file(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """checkpoint_dir names a shard file, not the folder of step folders."""
    step_dir = copy_small(root, pristine)
    return {**small_overrides(root), "experiment.checkpoint_dir": str(step_dir / "__0_0.distcp")}


def _beyond_float16(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """A finite float32 value (1e6) that float16 cannot hold, exported as float16."""
    value = torch.full((4,), 1e6, dtype=torch.float32).numpy().tobytes()
    overwrite_tensor_bytes(copy_small(root, pristine), VICTIM, value)
    return {**small_overrides(root), "experiment.export_dtype": "float16"}


def _only_at(where: str) -> Prepare:
    """A copy of the small checkpoint, with ``checkpoint_dir`` at ``where`` under the case's
    folder (the step folder, or the dump folder that holds ``checkpoint/``)."""

    def prepare(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
        return {**_copy(root, pristine, cleanup), "experiment.checkpoint_dir": str(root / where)}

    return prepare


def _hf_last_save(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """torchtitan's last_save_in_hf: the last step folder holds safetensors, no DCP index."""
    copy_small(root, pristine)
    hf = root / "checkpoint" / "step-20"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"\0" * 64)
    (hf / "model.safetensors.index.json").write_text("{}")
    return {**small_overrides(root), "experiment.step": "20"}


def _only(**overrides: str) -> Prepare:
    def prepare(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
        return {**_copy(root, pristine, cleanup), **overrides}

    return prepare


def _only_after(prepare: Prepare, **overrides: str) -> Prepare:
    def prepare_with(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
        return {**prepare(root, pristine, cleanup), **overrides}

    return prepare_with


def _check_small(root: Path, weights: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(OUT)
    assert_matches(root / "out" / "model.pt", weights, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The same faults into a Hugging Face folder (output_format=hf)
# --------------------------------------------------------------------------------------------

HF_OUT = "model_hf"
HF_DESCRIBING = {
    "config.json",
    "generation_config.json",
    "titan2tune.torchtune.yaml",
    "titan2tune.manifest.json",
}


def assert_matches_hf(
    folder: Path, weights: dict[str, torch.Tensor], shape: demo.ModelShape, dtype: torch.dtype
) -> None:
    """The folder's shards, as safetensors loads them, hold exactly torchtitan 0.3.0's to_hf of
    the weights, cast; nothing else but the files that describe them is in the folder."""
    from safetensors.torch import load_file

    from tests.peers import titan_writer

    cfg = titan_writer.shape_config(shape)
    expected = titan_writer.titan_to_hf(cfg, titan_writer.meta_to_titan(weights))
    shards = sorted(folder.glob("*.safetensors"))
    index = {"model.safetensors.index.json"} if len(shards) > 1 else set()
    assert {p.name for p in folder.iterdir()} == {*(p.name for p in shards), *index, *HF_DESCRIBING}
    found: dict[str, torch.Tensor] = {}
    for shard in shards:
        found |= load_file(shard)
    assert sorted(found) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor.to(dtype)), key


def _as_hf(prepare: Prepare, **more: str) -> Prepare:
    """The same case, converted into a Hugging Face folder ``model_hf`` where the ``.pt`` was
    to go."""

    def prepare_hf(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
        overrides = prepare(root, pristine, cleanup)
        output = Path(overrides["experiment.output"]).with_name(HF_OUT)
        return {**overrides, "output_format": "hf", "experiment.output": str(output), **more}

    return prepare_hf


def _hf_output_locked(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    overrides = _as_hf(_copy)(root, pristine, cleanup)
    hold_lock(root / "out" / f".{HF_OUT}.lock", cleanup)
    return overrides


def _hf_output_is_a_file(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    (root / "out").mkdir()
    (root / "out" / HF_OUT).write_text("keep me\n")
    return _as_hf(_copy, overwrite="true")(root, pristine, cleanup)


def _hf_output_holds_the_checkpoint(
    root: Path, pristine: Path, cleanup: ExitStack
) -> dict[str, str]:
    """experiment.output names the checkpoint folder itself: replacing it would delete it."""
    overrides = _as_hf(_copy, overwrite="true")(root, pristine, cleanup)
    return {**overrides, "experiment.output": str(root / "checkpoint")}


def _hf_tokenizer_missing(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    more = {"experiment.tokenizer_dir": str(root / "no_such_assets")}
    return _as_hf(_copy, **more)(root, pristine, cleanup)


def _hf_many_shards(root: Path, pristine: Path, cleanup: ExitStack) -> dict[str, str]:
    """Every tensor a shard of its own, or nearly: more files than the run has descriptors
    to spare if it held them all, and the read-back on two threads."""
    return _as_hf(_copy, workers="2", **{"output_format.max_shard_size": "9KB"})(
        root, pristine, cleanup
    )


def _check_small_hf(root: Path, weights: dict[str, torch.Tensor]) -> None:
    folders = [p for p in (root / "out").rglob(HF_OUT)]
    assert len(folders) == 1 and sorted(p.name for p in folders[0].parent.iterdir()) == [HF_OUT]
    assert_matches_hf(folders[0], weights, SMALL, torch.bfloat16)


def _check_many_shards(root: Path, weights: dict[str, torch.Tensor]) -> None:
    _check_small_hf(root, weights)
    assert len(list((root / "out" / HF_OUT).glob("model-*-of-*.safetensors"))) > 12


CASES: dict[str, Case] = {
    "checkpoint_folder_missing": Case(
        _missing_folder, ("no_such_folder", "does not exist", "Set experiment.checkpoint_dir")
    ),
    "checkpoint_folder_empty": Case(
        _empty_folder, ("is not a torchtitan checkpoint folder", "holds nothing")
    ),
    "checkpoint_folder_not_dcp": Case(
        _not_dcp,
        (
            "no step-<N> folders",
            "model.safetensors",
            "Hugging Face checkpoint",
            "needs no conversion",
            "FullModelHFCheckpointer loads it as it is",
        ),
    ),  # fmt: skip
    "checkpoint_dir_is_a_step_folder": Case(
        _only_at(f"checkpoint/step-{STEP}"),
        ("It is a step folder itself", f"experiment.step={STEP}", "checkpoint_dir="),
    ),
    "checkpoint_dir_is_the_dump_folder": Case(
        _only_at("."), ("looks like the run's dump folder", "its step folders are in")
    ),
    "step_is_a_hugging_face_save": Case(
        _hf_last_save, ("step-20", "Hugging Face safetensors save", "last_save_in_hf", "[10]")
    ),
    "latest_passes_over_a_hugging_face_save": Case(
        _only_after(_hf_last_save, **{"experiment.step": "latest"}),
        ("step-20", "a Hugging Face save (torchtitan's checkpoint.last_save_in_hf)", "step-10"),
        ok=True,
    ),
    "step_missing_lists_steps": Case(
        _step_missing, ("no step-7 folder", "[10, 20]", "Set experiment.step")
    ),
    "step_named_twice": Case(
        _step_named_twice, ("step-010 and", "step-10 both name step 10", "rename or move")
    ),
    "latest_skips_unfinished_save": Case(
        _latest_unfinished,
        ("step-20", "has no .metadata (an unfinished save)", "using the newest DCP save, step-10"),
        ok=True,
        check=_check_latest,
    ),
    "metadata_truncated": Case(
        _metadata_truncated, (f"step-{STEP}/.metadata", "truncated or damaged", "experiment.step")
    ),
    "metadata_garbage": Case(_metadata_garbage, (f"step-{STEP}/.metadata", "truncated or damaged")),
    "metadata_is_a_fifo": Case(
        _metadata_fifo, (f"step-{STEP}/.metadata is not a regular file", "Copy the step folder")
    ),
    "metadata_unknown_format": Case(
        _metadata_unknown,
        (f"step-{STEP}/.metadata", "not a torch.distributed.checkpoint index", "holds a dict"),
    ),
    "shard_missing": Case(_shard_missing, ("__1_0.distcp", "is missing", "Copy the whole step")),
    "shard_truncated": Case(_shard_truncated, ("__1_0.distcp", "is truncated")),
    "shard_bytes_overwritten": Case(
        _shard_overwritten, (repr(VICTIM), "16 NaN/Inf values", "allow_nonfinite=true")
    ),
    "shard_bytes_overwritten_allowed": Case(
        _shard_overwritten_allowed,
        ("wrote", "16 NaN/Inf values were written (allow_nonfinite=true)"),
        ok=True,
        check=_check_nan_written,
    ),
    "shard_bytes_overwritten_two_workers": Case(
        _only_after(_shard_overwritten, workers="2"),
        (repr(VICTIM), "16 NaN/Inf values", "allow_nonfinite=true"),
    ),
    "value_below_float16": Case(
        _below_float16,
        ("non-zero values underflowed to 0 in float16 (below 3e-08", repr(VICTIM)),
        ok=True,
        check=_check_underflows_counted,
    ),
    "value_beyond_float16": Case(
        _beyond_float16, (repr(VICTIM), "values up to 1e+06, beyond what torch.float16 holds")
    ),
    "lacks_model_weights": Case(
        _lacks_a_layer, ("lacks model weights", "layers.1.feed_forward.w1.weight")
    ),
    "unfinished_step_asked_for": Case(
        _unfinished_step_asked_for, ("step-20", "has no .metadata file", "did not finish")
    ),
    "checkpoint_dir_is_a_file": Case(
        _checkpoint_dir_is_a_file,
        ("__0_0.distcp is a file, not a folder", "folder that holds the step-<N> folders"),
    ),
    "unknown_keys_listed": Case(
        _unknown_keys,
        ("no known torchtitan layout", "vision_tower.proj.weight", "attention.q_norm.weight"),
    ),
    "heads_contradict_fused_qkv": Case(
        _heads_contradict, ("n_heads=6", "n_kv_heads=2", "attention.qkv_linear.wqkv.weight")
    ),
    "output_folder_missing_is_made": Case(
        _output_folder_missing, ("wrote",), ok=True, check=_check_output_folder_made
    ),
    "output_folder_read_only": Case(_output_read_only, ("out/model.pt", "read-only")),
    "output_disk_full": Case(_disk_full, ("out/model.pt", "the disk is full")),
    "output_file_size_limit": Case(
        _copy, ("out/model.pt", "file size limit"), prlimit=("--fsize=65536",)
    ),
    "output_is_a_source_file": Case(
        _output_is_source, ("out/model.pt", "is the source file", "__0_0.distcp")
    ),
    "output_inside_step_folder": Case(
        _output_in_step_folder, (f"step-{STEP}/model.pt", "inside the source step folder")
    ),
    "output_is_a_folder": Case(
        _output_is_a_folder,
        ("out/model.pt is a folder", "remove the folder", "out/model.pt/model.pt"),
        absent=("overwrite=true to replace",),
    ),
    "output_is_a_folder_with_overwrite": Case(
        _only_after(_output_is_a_folder, overwrite="true"),
        ("out/model.pt is a folder", "remove the folder"),
        absent=("overwrite=true to replace", "Replacing"),
    ),
    "manifest_name_is_a_folder": Case(
        _sidecar_is_a_folder,
        ("out/model.pt.manifest.json is a folder", "Remove or rename the folder"),
        absent=("overwrite=true to replace",),
    ),
    "output_locked_by_another_run": Case(
        _output_locked, ("Another conversion is writing", "out/.model.pt.lock")
    ),
    "debug_shows_traceback": Case(
        _missing_folder_debug,
        ("Traceback", "ConversionError", "no_such_folder"),
        traceback=True,
    ),
    "hydra_full_error_shows_traceback": Case(
        _missing_folder,
        ("Traceback", "ConversionError", "no_such_folder"),
        traceback=True,
        env={"HYDRA_FULL_ERROR": "1"},
    ),
    # An untied head with tied_embeddings=true fails with verify=false too: kept (meta) or
    # left out (torchtune), torchtune's LLAMA3_2 would tie it to the embeddings silently.
    "untied_head_with_tied_embeddings_unverified": Case(
        _only(**{"experiment.model.tied_embeddings": "true", "verify": "false"}),
        ("tied_embeddings=true", "differs from the embeddings", "tied_embeddings=false"),
    ),
    "untied_head_with_tied_embeddings_unverified_torchtune": Case(
        _only(
            **{
                "experiment.model.tied_embeddings": "true",
                "verify": "false",
                "output_format": "torchtune",
            }
        ),
        ("tied_embeddings=true", "differs from the embeddings", "tied_embeddings=false"),
    ),
    "low_fd_limit_completes": Case(
        _only(workers="2"), ("wrote",), ok=True, prlimit=("--nofile=64",), check=_check_small
    ),
    "hf_output_folder_missing_is_made": Case(
        _as_hf(_output_folder_missing), ("wrote",), ok=True, check=_check_small_hf
    ),
    "hf_many_shards_low_fd_limit_completes": Case(
        _hf_many_shards, ("wrote",), ok=True, prlimit=("--nofile=64",), check=_check_many_shards
    ),
    "hf_shard_bytes_overwritten": Case(
        _as_hf(_shard_overwritten), (repr(VICTIM), "16 NaN/Inf values", "allow_nonfinite=true")
    ),
    "hf_output_folder_read_only": Case(_as_hf(_output_read_only), (f"out/{HF_OUT}", "read-only")),
    "hf_output_disk_full": Case(_as_hf(_disk_full), (f"out/{HF_OUT}", "the disk is full")),
    "hf_output_file_size_limit": Case(
        _as_hf(_copy), (f"out/{HF_OUT}", "file size limit"), prlimit=("--fsize=65536",)
    ),
    "hf_output_inside_step_folder": Case(
        _as_hf(_output_in_step_folder), (f"step-{STEP}/{HF_OUT}", "inside the source step folder")
    ),
    "hf_output_holds_the_checkpoint": Case(
        _hf_output_holds_the_checkpoint,
        ("holds the source step folder", "replacing the output would delete the checkpoint"),
    ),
    "hf_output_is_a_file": Case(
        _hf_output_is_a_file,
        (f"out/{HF_OUT} is a file", "writes a folder", "remove the file"),
        absent=("Replacing",),
    ),
    "hf_output_locked_by_another_run": Case(
        _hf_output_locked, ("Another conversion is writing", f"out/.{HF_OUT}.lock")
    ),
    "hf_tokenizer_dir_missing": Case(
        _hf_tokenizer_missing, ("experiment.tokenizer_dir=", "no_such_assets", "does not exist")
    ),
    "hf_untied_head_with_tied_embeddings_unverified": Case(
        _as_hf(_copy, **{"experiment.model.tied_embeddings": "true", "verify": "false"}),
        ("tied_embeddings=true", "differs from the embeddings", "tied_embeddings=false"),
    ),
}


@dataclass
class Run:
    returncode: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    root: Path
    seconds: float


@pytest.fixture(scope="module")
def runs(small, tmp_path_factory) -> Iterator[dict[str, Run | str]]:
    """Runs every case of CASES, CONCURRENT_RUNS at a time; a case that cannot be set up
    here (no mount permission) maps to the reason."""
    pristine, _ = small
    results: dict[str, Run | str] = {}
    hydra_root = tmp_path_factory.mktemp("hydra")
    with ExitStack() as cleanup:
        pending = []
        for name, case in CASES.items():
            root = tmp_path_factory.mktemp(name)
            try:
                overrides = case.prepare(root, pristine, cleanup)
            except (pytest.skip.Exception, pytest.fail.Exception) as e:
                results[name] = str(e)
                continue
            cmd = command(overrides, hydra_root / name)
            if case.prlimit:
                cmd = ["prlimit", *case.prlimit, "--", *cmd]
            pending.append((name, root, cmd, child_env(case.env), snapshot(root)))
        running: list[tuple[str, Path, subprocess.Popen, dict[str, str], io.IOBase, float]] = []
        while pending or running:
            while pending and len(running) < CONCURRENT_RUNS:
                name, root, cmd, env, before = pending.pop(0)
                err = open(hydra_root / f"{name}.stderr", "w+")  # noqa: SIM115
                proc = subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err
                )
                running.append((name, root, proc, before, err, time.perf_counter()))
            for item in list(running):
                name, root, proc, before, err, start = item
                seconds = time.perf_counter() - start
                if proc.poll() is None:
                    if seconds > RUN_TIMEOUT:  # a hung run fails its case, not the session
                        proc.kill()
                        proc.wait()
                        err.write(f"\n(killed by the test after {RUN_TIMEOUT} s)")
                    continue
                running.remove(item)
                err.seek(0)
                after = snapshot(root)
                results[name] = Run(proc.returncode, err.read(), before, after, root, seconds)
                err.close()
                print(f"{name}: exit {proc.returncode} in {seconds:.1f} s")
            time.sleep(0.1)
        yield results


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, runs, small):
    """The run exits as it should, says what is wrong and what to do, and, unless it was to
    succeed, leaves every file under the case's folder as it was."""
    case, run = CASES[name], runs[name]
    if isinstance(run, str):
        unavailable(run)
    for fragment in case.expect:
        assert fragment in run.stderr, f"{fragment!r} not in:\n{run.stderr}"
    for fragment in case.absent:
        assert fragment not in run.stderr, f"{fragment!r} in:\n{run.stderr}"
    assert ("Traceback" in run.stderr) == case.traceback, run.stderr
    if case.ok:
        assert run.returncode == 0, run.stderr
        elsewhere = {k: v for k, v in run.after.items() if k != "out" and k.split("/")[0] != "out"}
        assert elsewhere == run.before, "the run changed files outside its output folder"
    else:
        assert run.returncode != 0, run.stderr
        if not case.traceback:
            line = error_line(run.stderr)
            assert line and len(line) < 800, f"not one short error line:\n{run.stderr}"
        assert run.after == run.before, "the failed run left files or changed the source"
    if case.check is not None:
        case.check(run.root, small[1])


# --------------------------------------------------------------------------------------------
# A source changed in place after a conversion: the re-run must not call the output up to date
# --------------------------------------------------------------------------------------------


def test_shard_changed_in_place_is_converted_again(small, tmp_path):
    """Bytes of a shard rewritten in place, the file's size and ``.metadata`` unchanged: the
    re-run sees the new mtime and converts again instead of skipping. An unchanged re-run is
    skipped; without ``overwrite=true`` the changed source is refused, not skipped."""
    pristine, weights = small
    step_dir = copy_small(tmp_path, pristine)
    cmd = command({**small_overrides(tmp_path), "verify": "false"}, tmp_path / "hydra")
    output = tmp_path / "out" / "model.pt"

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cmd, *extra], cwd=REPO, env=child_env(), capture_output=True, text=True,
            timeout=RUN_TIMEOUT,
        )  # fmt: skip

    first = run()
    assert first.returncode == 0 and "wrote" in first.stderr, first.stderr
    assert_matches(output, weights, torch.bfloat16)
    unchanged = run()
    assert unchanged.returncode == 0, unchanged.stderr
    assert "is up to date with this source and settings; skipped" in unchanged.stderr

    shard, first_row = _victim_chunk(step_dir)
    before, stat = shard.read_bytes(), shard.stat()
    size = len(before)
    overwrite_tensor_bytes(step_dir, VICTIM, torch.full((16,), 0.5).numpy().tobytes())
    assert shard.read_bytes() != before and shard.stat().st_size == size
    # A rewrite within the clock's granularity could keep the mtime: make it later for sure.
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))

    refused = run()
    assert refused.returncode != 0, refused.stderr
    assert "skipped" not in refused.stderr and "already exists" in refused.stderr
    converted = run("overwrite=true")
    assert converted.returncode == 0, converted.stderr
    assert "skipped" not in converted.stderr and "wrote" in converted.stderr
    written = torch.load(output, mmap=True, weights_only=True)[VICTIM]
    at = first_row * written.shape[1]
    assert torch.equal(written.flatten()[at : at + 16], torch.full((16,), 0.5).bfloat16())
    assert not torch.equal(written, weights[VICTIM].bfloat16())
    again = run()
    assert again.returncode == 0 and "skipped" in again.stderr, again.stderr


def test_nan_allowed_once_is_not_up_to_date_for_a_run_that_refuses_it(small, tmp_path):
    """An output written with allow_nonfinite=true holds NaN: a run without it is refused
    (not skipped as up to date), and with overwrite=true converts again, failing on them."""
    pristine, _ = small
    overwrite_tensor_bytes(copy_small(tmp_path, pristine), VICTIM, b"\xff" * 64)
    cmd = command({**small_overrides(tmp_path), "verify": "false"}, tmp_path / "hydra")

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cmd, *extra], cwd=REPO, env=child_env(), capture_output=True, text=True,
            timeout=RUN_TIMEOUT,
        )  # fmt: skip

    assert run("allow_nonfinite=true").returncode == 0
    assert "skipped" in run("allow_nonfinite=true").stderr
    refused = run()
    assert refused.returncode != 0 and "skipped" not in refused.stderr
    assert "holds NaN/Inf values in 1 tensor, written with allow_nonfinite=true" in (refused.stderr)
    again = run("overwrite=true")
    assert again.returncode != 0 and "16 NaN/Inf values" in again.stderr
    # Written by another converter's code: converted again whatever this run allows, so the
    # refusal is the source's NaN, not advice to keep an output this code did not write.
    manifest = tmp_path / "out" / "model.pt.manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["fingerprint"]["converter_code_xxh3_128"] = "0" * 32
    manifest.write_text(json.dumps(recorded))
    other = run()
    assert other.returncode != 0 and "16 NaN/Inf values" in other.stderr, other.stderr[-2000:]
    assert "Set allow_nonfinite=true to keep it as it is" not in other.stderr
    assert run("allow_nonfinite=true").returncode == 0
    assert "skipped" in run("allow_nonfinite=true").stderr


def _victim_chunk(step_dir: Path) -> tuple[Path, int]:
    """The shard file holding the chunk of VICTIM that ``overwrite_tensor_bytes`` changes, and
    the chunk's first row."""
    index = read_index(step_dir)
    chunk = index.state_dict_metadata[VICTIM].chunks[0]
    info = index.storage_data[MetadataIndex(VICTIM, chunk.offsets)]
    return step_dir / info.relative_path, chunk.offsets[0]


# --------------------------------------------------------------------------------------------
# The sink on a filling disk, in-process: every short write must be resumed or reported
# --------------------------------------------------------------------------------------------


def _create(out: Output, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Filler:
    """A ``.pt`` of ``layout`` (name -> shape, dtype), its structure written, ready to fill."""
    path = out.staging("")
    tensors = [OutputTensor(name, shape, dtype, ()) for name, (shape, dtype) in layout.items()]
    offsets = FORMATS["meta"].create(path, tensors)
    return out.filler({name: ("", offset) for name, offset in offsets.items()})


def test_disk_filling_mid_tensor_is_reported_not_truncated(tmp_path):
    """On a filling disk ``pwrite`` first writes part of a buffer, then fails. A write that
    resumed at the wrong byte (a multi-dimensional view sliced by rows) lost data silently."""
    with tmpfs(tmp_path / "fs", "256k") as fs:
        layout = {f"t{i}": ((256, 256), torch.float32) for i in range(4)}
        with (
            pytest.raises(ConversionError, match="the disk is full"),
            Output(fs / "model.pt", folder=False) as out,
        ):
            filler = _create(out, layout)
            for name in layout:
                filler.write(name, 0, torch.ones(256, 256))
        assert list(fs.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Publishing, in-process: the manifest and snippet never outlive a failed publish of the output
# --------------------------------------------------------------------------------------------

SIDECAR_TEXTS = {"model.pt.torchtune.yaml": "checkpointer: {}\n", "model.pt.manifest.json": "{}\n"}


def _filled(out: Output) -> None:
    filler = _create(out, {"t": ((64, 64), torch.float32)})
    filler.write("t", 0, torch.ones(64, 64))
    filler.sync()


def _publish_texts(folder: Path) -> dict[Path, str]:
    return {folder / name: text for name, text in SIDECAR_TEXTS.items()}


@pytest.mark.parametrize(
    "blocked, match",
    [("model.pt", "a folder is in the way"), ("model.pt.manifest.json", "model.pt.manifest.json")],
    ids=["output", "manifest"],
)
def test_a_failing_rename_during_publish_leaves_nothing(tmp_path, blocked, match):
    """A folder appears, after the checks, at the name of the output (its rename fails before
    any sidecar's) or of the manifest (renamed last, after the output and the snippet): what
    was renamed into place is removed again, and only the folder, untouched, is left."""
    texts = _publish_texts(tmp_path)
    with (
        pytest.raises(ConversionError, match=match),
        Output(tmp_path / "model.pt", False, tuple(texts)) as out,
    ):
        _filled(out)
        (tmp_path / blocked).mkdir()
        (tmp_path / blocked / "notes.txt").write_text("keep me\n")
        out.publish(texts)
    assert snapshot(tmp_path) == {blocked: "dir", f"{blocked}/notes.txt": _sha_text("keep me\n")}


def test_sidecar_write_failing_publishes_nothing(tmp_path):
    """The disk fills while the sidecars are written, after the output is complete: nothing,
    not the output, is renamed into place."""
    with tmpfs(tmp_path / "fs", "64k") as fs:
        texts = {fs / name: "x" * (48 << 10) for name in SIDECAR_TEXTS}
        with (
            pytest.raises(ConversionError, match="the disk is full"),
            Output(fs / "model.pt", False, tuple(texts)) as out,
        ):
            _filled(out)  # 16 KiB of tensor, and the archive's structure
            out.publish(texts)
        assert list(fs.iterdir()) == []


def test_orphaned_sidecars_are_removed_and_logged(tmp_path, caplog):
    """Sidecars and their temporaries without the output they describe (a run killed during
    publish) are removed by the next run, which says so; a published run leaves them all."""
    texts = _publish_texts(tmp_path)
    for path, text in texts.items():
        path.write_text(text)
        path.with_name(f".{path.name}.partial").write_text(text[:3])
    with caplog.at_level("INFO"), Output(tmp_path / "model.pt", False, tuple(texts)) as out:
        assert list(tmp_path.glob("model.pt.*")) == []
        _filled(out)
        out.publish({path: text.upper() for path, text in texts.items()})
    for path in texts:
        assert f"Removed {path}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUT)
    assert all(path.read_text() == text.upper() for path, text in texts.items())


# Runs convert.py as `python convert.py ARGS` does, and sends itself signal argv[1] right after
# the rename that publishes argv[2]: a window no outside signal can hit reliably.
SIGNALLED_AFTER_RENAME = """
import os, runpy, signal, sys
signum, target, rename = int(sys.argv[1]), sys.argv[2], os.replace

def replace(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if os.fspath(dst) == target:
        os.kill(os.getpid(), signum)

os.replace = replace
sys.argv = ["convert.py", *sys.argv[3:]]
runpy.run_path("convert.py", run_name="__main__")
"""


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("renamed", ["model.pt", "model.pt.torchtune.yaml"])
def test_sigkill_between_output_and_manifest_is_repaired_by_the_next_run(
    small, tmp_path, renamed, overwrite
):
    """Killed after the output (or the recipe snippet) is renamed into place and before the
    manifest: the output is complete, its manifest staged. The next run finishes the publish,
    says so, and finds the output up to date. With overwrite=true the old output's manifest is
    still beside the new file until then, and is not trusted."""
    pristine, weights = small
    copy_small(tmp_path, pristine)
    overrides = small_overrides(tmp_path)
    out = tmp_path / "out"
    if overwrite:  # an older conversion, in float32, is there to be replaced
        old = subprocess.run(
            command({**overrides, "experiment.export_dtype": "float32"}, tmp_path / "hydra0"),
            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip
        assert old.returncode == 0, old.stderr
        overrides["overwrite"] = "true"
    sources = snapshot(tmp_path / "checkpoint")
    argv = command(overrides, tmp_path / "hydra1")[2:]
    killed = subprocess.run(
        [sys.executable, "-c", SIGNALLED_AFTER_RENAME, str(signal.SIGKILL), str(out / renamed),
         *argv],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / ".model.pt.manifest.json.partial").is_file()
    assert (out / "model.pt.manifest.json").exists() == overwrite  # the old one
    assert_matches(out / "model.pt", weights, torch.bfloat16)

    rerun = subprocess.run(
        command(overrides, tmp_path / "hydra2"),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, said
    assert f"Finished publishing {out / 'model.pt'}" in said, said
    assert "is up to date with this source and settings; skipped" in said, said
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT)
    manifest = json.loads((out / "model.pt.manifest.json").read_text())
    assert manifest["output"]["dtype"] == "bfloat16"
    recorded = manifest["output"]["files"][""]
    assert recorded["xxh3_128"] == xxhash.xxh3_128_hexdigest((out / "model.pt").read_bytes())
    assert_matches(out / "model.pt", weights, torch.bfloat16)
    assert snapshot(tmp_path / "checkpoint") == sources


def _cli_run(
    overrides: dict[str, str], hydra: Path, kill_after: Path | None = None, signum: int = 9
) -> subprocess.CompletedProcess:
    """``python convert.py`` with ``overrides``; sent ``signum`` (SIGKILL) right after the
    rename to ``kill_after``, if given."""
    argv = command(overrides, hydra)
    if kill_after:
        argv = [sys.executable, "-c", SIGNALLED_AFTER_RENAME, str(signum), str(kill_after),
                *argv[2:]]  # fmt: skip
    return subprocess.run(
        argv, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def _a_float32_folder(small, tmp_path: Path) -> tuple[dict, Path, dict[str, str]]:
    """A float32 Hugging Face folder at tmp_path/out, and the overrides that replace it by a
    bfloat16 one (overwrite=true); returns the weights, the folder and those overrides."""
    pristine, weights = small
    overrides = _as_hf(_copy)(tmp_path, pristine, ExitStack()) | {"overwrite": "true"}
    old = _cli_run({**overrides, "experiment.export_dtype": "float32"}, tmp_path / "hydra0")
    assert old.returncode == 0, old.stderr
    folder = tmp_path / "out" / HF_OUT
    assert_matches_hf(folder, weights, SMALL, torch.float32)
    return weights, folder, overrides


@pytest.mark.parametrize("renamed", [f".{HF_OUT}.replaced", HF_OUT])
def test_sigkill_while_a_folder_is_replaced_is_repaired_by_the_next_run(small, tmp_path, renamed):
    """A float32 folder is replaced (overwrite=true) by a bfloat16 one, and the run is killed
    right after the old folder is moved aside (``.model_hf.replaced``), or right after the new
    one is renamed into place, before the old one is removed. Either way the output's name
    holds one complete folder or none, never a mix; the next run puts the old folder back and
    replaces it, or finds the new one up to date; nothing is left beside it."""
    weights, folder, overrides = _a_float32_folder(small, tmp_path)
    out = folder.parent
    sources = snapshot(tmp_path / "checkpoint")

    killed = _cli_run(overrides, tmp_path / "hydra1", out / renamed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    aside = out / f".{HF_OUT}.replaced"
    assert_matches_hf(aside, weights, SMALL, torch.float32)  # the old folder, whole
    if renamed == HF_OUT:
        assert_matches_hf(folder, weights, SMALL, torch.bfloat16)  # the new one, whole
    else:
        assert not folder.exists()

    rerun = _cli_run(overrides, tmp_path / "hydra2")
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, said
    if renamed == HF_OUT:
        assert "is up to date with this source and settings; skipped" in said, said
    else:
        assert f"Put {folder} back in place" in said and f"wrote {folder}" in said, said
    assert sorted(p.name for p in out.iterdir()) == [HF_OUT]
    assert_matches_hf(folder, weights, SMALL, torch.bfloat16)
    assert snapshot(tmp_path / "checkpoint") == sources


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("renamed", ["model.pt", "model.pt.torchtune.yaml"])
def test_a_stop_while_an_output_is_replaced_takes_effect_once_it_is_published(
    small, tmp_path, renamed, signum
):
    """Ctrl-C or SIGTERM right after a forced rebuild renamed its new file (or its snippet)
    over an up-to-date output: the publish finishes, then the run stops (exit 128 + n). Rolled
    back, it would have left neither the old output nor the new one."""
    pristine, weights = small
    copy_small(tmp_path, pristine)
    overrides = small_overrides(tmp_path)
    out = tmp_path / "out"
    first = _cli_run(overrides, tmp_path / "hydra0")
    assert first.returncode == 0, first.stderr
    forced = {**overrides, "force": "true"}
    stopped = _cli_run(forced, tmp_path / "hydra1", out / renamed, signum)
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signum, said
    assert f"Published {out / 'model.pt'} with 2 describing files; then the stop" in said, said
    assert "Traceback" not in said, said
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT)
    assert_matches(out / "model.pt", weights, torch.bfloat16)
    rerun = _cli_run(overrides, tmp_path / "hydra2")
    said = rerun.stdout + rerun.stderr
    assert "is up to date with this source and settings; skipped" in said, said
    assert "Finished publishing" not in said, said


def test_a_stop_while_a_folder_is_replaced_takes_effect_once_it_is_published(small, tmp_path):
    """Ctrl-C right after the old folder was moved aside: the new one is still renamed into
    place, and the old one removed, before the run stops; nothing is left hidden."""
    weights, folder, overrides = _a_float32_folder(small, tmp_path)
    out = folder.parent
    stopped = _cli_run(overrides, tmp_path / "hydra1", out / f".{HF_OUT}.replaced", signal.SIGINT)
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGINT, said
    assert f"Published {folder}; then the stop (SIGINT) took effect" in said, said
    assert sorted(p.name for p in out.iterdir()) == [HF_OUT]
    assert_matches_hf(folder, weights, SMALL, torch.bfloat16)
    rerun = _cli_run(overrides, tmp_path / "hydra2")
    assert "is up to date with this source and settings; skipped" in rerun.stderr + rerun.stdout


def test_a_folder_whose_describing_files_fill_the_disk_publishes_nothing(tmp_path):
    """The disk fills while config.json and the rest are written, after the shards are
    complete: no folder is published, and the folder it was to replace is left as it was."""
    from converter.formats.safetensors_file import create as create_shard

    with tmpfs(tmp_path / "fs", "96k") as fs:
        (fs / HF_OUT).mkdir()
        (fs / HF_OUT / "notes.txt").write_text("keep me\n")
        texts = {Path(name): "x" * (40 << 10) for name in ("config.json", "generation_config.json")}
        with (
            pytest.raises(ConversionError, match="the disk is full"),
            Output(fs / HF_OUT, folder=True) as out,
        ):
            path = out.staging("model.safetensors")
            tensor = OutputTensor("t", (64, 64), torch.float32, ())
            offsets = create_shard(path, [tensor])
            filler = out.filler({"t": ("model.safetensors", offsets["t"])})
            filler.write("t", 0, torch.ones(64, 64))
            filler.sync()
            out.publish(texts)
        assert snapshot(fs) == {HF_OUT: "dir", f"{HF_OUT}/notes.txt": _sha_text("keep me\n")}


def _sha_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Killed, raced, and starved runs, on the large checkpoint
# --------------------------------------------------------------------------------------------


def _written_fraction(path: Path, probes: int = 512) -> float:
    """About how much of the partial file, or of the files of a partial folder, holds written
    bytes: the share of ``probes`` 4 KiB blocks, evenly spread, that are not all zeros (cheap
    enough to ask between a conversion's windows). A lone run allocates the blocks of the
    tensors' bytes before it writes any (see converter/filler.py), so the allocated size tells
    nothing of the progress; the weights here hold no 4 KiB of zeros."""
    try:
        files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        written = taken = 0
        for file, size in zip(files, sizes, strict=True):
            n = probes * size // total if total else 0
            with open(file, "rb") as f:
                for i in range(n):
                    f.seek(size * i // n)
                    written += bool(f.read(4096).strip(b"\0"))
            taken += n
    except FileNotFoundError:  # published meanwhile
        return 0.0
    return written / taken if taken else 0.0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


@dataclass(frozen=True)
class BigOutput:
    """A conversion of the big checkpoint into a .pt, or into a folder of several shards."""

    name: str
    settings: dict[str, str]

    def overrides(self, checkpoint: Path, out: Path, **more: str) -> dict[str, str]:
        return big_overrides(checkpoint, out / self.name, **self.settings, **more)

    def published(self, out: Path) -> set[str]:
        return set(OUT) if self.name == "model.pt" else {self.name}

    def check(self, out: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        if self.name == "model.pt":
            assert_matches(out / self.name, weights, dtype)
        else:
            assert len(list((out / self.name).glob("model-*.safetensors"))) > 2
            assert_matches_hf(out / self.name, weights, BIG, dtype)


BIG_OUTPUTS = {
    "pt": BigOutput("model.pt", {}),
    "hf": BigOutput(HF_OUT, {"output_format": "hf", "output_format.max_shard_size": "100MB"}),
}


# convert.py, SIGKILLed as the read-back of its output ends: every tensor is written by then.
KILLED_IN_READ_BACK = """
import os, runpy, signal, sys
import converter.verify

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

converter.verify.ReadBehind.finish = killed
sys.argv = ["convert.py", *sys.argv[1:]]
runpy.run_path("convert.py", run_name="__main__")
"""


@pytest.mark.parametrize("kind", list(BIG_OUTPUTS))
def test_sigkill_during_write_leaves_no_output_and_next_run_succeeds(big, tmp_path, kind):
    """SIGKILL cannot be caught: what is left is what the design leaves. Killed while the
    structure is written, half-way through the tensors, as the last ones are written, and as
    the output is read back, a run leaves only its hidden partial (file or folder) and lock
    file; the next run removes them and succeeds."""
    checkpoint, weights, sources = big
    target = BIG_OUTPUTS[kind]
    out = tmp_path / "out"
    cmd = command(target.overrides(checkpoint, out, batch_mb="32"), tmp_path / "hydra")
    partial = out / f".{target.name}.partial"
    killed_in_read_back = [sys.executable, "-c", KILLED_IN_READ_BACK, *cmd[2:]]
    # Each point: the run, and when to kill it.
    kill_points: dict[str, tuple[list[str], Callable[[], bool]]] = {
        "writing the structure": (cmd, lambda: True),
        "half the tensors written": (cmd, lambda: _written_fraction(partial) >= 0.5),
        "writing the last tensors": (cmd, lambda: _written_fraction(partial) >= 0.9),
        "reading the output back": (killed_in_read_back, lambda: False),  # it kills itself
    }
    for point, (argv, reached) in kill_points.items():
        stale = _identity(partial)  # left by the previous kill; this run must replace it
        proc = subprocess.Popen(
            argv, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            while proc.poll() is None and not (
                _identity(partial) not in (None, stale) and reached()
            ):
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"finished before {point}: {stderr}"
        assert not (out / target.name).exists(), point
        left = {p.name for p in out.iterdir()}
        assert left <= {f".{target.name}.partial", f".{target.name}.lock"}, (point, left)

    run = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert {p.name for p in out.iterdir()} == target.published(out)  # partial and lock gone
    target.check(out, weights, torch.bfloat16)
    assert snapshot(checkpoint) == sources


@pytest.mark.parametrize(
    "signum, said",
    [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")],
)
def test_a_stopped_run_prints_one_line_leaves_nothing_and_exits_128_plus_n(
    big, tmp_path, signum, said
):
    """SIGINT (Ctrl-C), SIGTERM (kill) or SIGHUP (a closed terminal) half-way through the
    tensors: one line, no traceback, exit 128 + the signal, and nothing left beside the
    output, as after any failure."""
    checkpoint, _, sources = big
    out = tmp_path / "out"
    cmd = command(big_overrides(checkpoint, out / "model.pt", batch_mb="32"), tmp_path / "hydra")
    partial = out / ".model.pt.partial"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while proc.poll() is None and not (partial.exists() and _written_fraction(partial) > 0.3):
            time.sleep(0.005)
        proc.send_signal(signum)
    finally:
        _, stderr = proc.communicate(timeout=120)
    stderr = stderr.decode()
    assert proc.returncode == 128 + signum, stderr
    assert f"Interrupted ({said}): no partial output was left" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert snapshot(checkpoint) == sources


@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_stop_while_starting_prints_one_line(tmp_path, signum, said):
    """Ctrl-C or SIGTERM while the imports run (Hydra in, torch not yet): one line, no
    traceback of the import it cut short, exit 128 + the signal, nothing written."""
    out, hydra_dir = tmp_path / "out", tmp_path / "hydra"
    cmd = command({"experiment.output": str(out / "model.pt")}, hydra_dir)
    # -X importtime reports each module once it is imported, on stderr.
    cmd.insert(1, "-Ximporttime")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    imported = []
    try:
        for line in proc.stderr:
            imported.append(line.decode().rsplit("|", 1)[-1].strip())
            if imported[-1] == "hydra":
                break
        proc.send_signal(signum)
    finally:
        _, rest = proc.communicate(timeout=120)
    assert "hydra" in imported and "torch" not in imported, imported
    stderr = rest.decode()
    assert proc.returncode == 128 + signum, stderr
    assert f"Interrupted ({said}) while starting: nothing was written." in stderr, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not out.exists() and not hydra_dir.exists()


def test_a_run_under_nohup_outlives_sighup(big, tmp_path):
    """nohup ignores SIGHUP so that a run outlives its terminal: the converter leaves a signal
    it finds ignored as it is, and the run converts."""
    checkpoint, weights, _ = big
    out = tmp_path / "out"
    cmd = command(big_overrides(checkpoint, out / "model.pt", batch_mb="32"), tmp_path / "hydra")
    partial = out / ".model.pt.partial"
    proc = subprocess.Popen(
        ["nohup", *cmd], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while proc.poll() is None and not (partial.exists() and _written_fraction(partial) > 0.3):
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGHUP)
    finally:
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    assert_matches(out / "model.pt", weights, torch.bfloat16)


@pytest.mark.parametrize("kind", list(BIG_OUTPUTS))
def test_two_runs_to_one_output_never_interleave(big, tmp_path, kind):
    """Started together, one run converts and the other fails at once, naming the lock; the
    output is the one complete conversion."""
    checkpoint, weights, sources = big
    target = BIG_OUTPUTS[kind]
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            command(
                target.overrides(checkpoint, out, **{
                    "experiment.export_dtype": "float32", "batch_mb": "32",
                }),
                tmp_path / f"hydra{i}",
            ),
            cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, f"expected one winner and one loser: {results}"
    loser = next(err for code, err in results if code != 0)
    assert "Another conversion is writing" in loser and f".{target.name}.lock" in loser, loser
    assert "Traceback" not in loser
    assert {p.name for p in out.iterdir()} == target.published(out)
    target.check(out, weights, torch.float32)
    assert snapshot(checkpoint) == sources


def _memory_cgroup_parent() -> Path:
    """Our own cgroup v1 memory folder: a child of it limits the run without moving it out of
    whatever accounting we run under."""
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.limit_in_bytes").exists():
        unavailable("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return base / path.lstrip("/")
    return base


def test_memory_cgroup_smaller_than_the_checkpoint(big, tmp_path):
    """A 400 MB memory cgroup (the cgroup v1 memory controller charges the page cache too)
    converts a ~580 MB float32 checkpoint to a ~580 MB output: memory is bounded by batch_mb."""
    checkpoint, weights, _ = big
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    limit = 400 << 20
    assert size > limit
    group = _memory_cgroup_parent() / f"titan2tune-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        # Cached pages stay charged to whoever read them first (this process, hashing the
        # checkpoint): evict them, so that the run's reads are charged to its cgroup.
        for path in checkpoint.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        out = tmp_path / "out" / "model.pt"
        cmd = command(
            big_overrides(checkpoint, out, **{
                "experiment.export_dtype": "float32", "batch_mb": "32",
            }),
            tmp_path / "hydra",
        )  # fmt: skip
        # The shell joins the cgroup, then becomes the converter: no Python code between
        # fork and exec in this (threaded) test process.
        join = f'echo $$ > {group / "cgroup.procs"} && exec "$@"'
        proc = subprocess.Popen(
            ["sh", "-c", join, "sh", *cmd], cwd=REPO, env=child_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _, stderr = proc.communicate(timeout=600)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    print(
        f"checkpoint {size / 2**20:.0f} MiB, cgroup limit {limit / 2**20:.0f} MiB: "
        f"max_usage_in_bytes {peak / 2**20:.0f} MiB (page cache included), failcnt {failcnt}"
    )
    assert proc.returncode == 0, f"exit {proc.returncode} (137: OOM-killed): {stderr}"
    manifest = json.loads(out.with_name("model.pt.manifest.json").read_text())
    print(f"durations: {manifest['durations_s']}")
    # Reading and writing ~1.1 GB through the page cache fills the cgroup: it was charged.
    assert peak > limit // 2, "the run was not charged to the cgroup"
    assert_matches(out, weights, torch.float32)
