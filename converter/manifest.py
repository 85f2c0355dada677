"""What is written beside each output: a manifest of the run and a torchtune recipe snippet.

The manifest accounts for every source key (converted or dropped, and why), records where the
data came from and how it was written, and carries the fingerprint that lets a re-run with the
same source and settings skip the work.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import Counter
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from converter import keymaps
from converter.config import ModelConfig
from converter.hashing import sha256_file

if TYPE_CHECKING:  # the job imports this module before torch (see converter.job)
    from converter.mapping import Plan
    from converter.source import DcpCheckpoint

MANIFEST_SUFFIX = ".manifest.json"
TORCHTUNE_SUFFIX = ".torchtune.yaml"
_PACKAGES = ("titan2tune", "torch", "hydra-core", "omegaconf", "submitit")


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + MANIFEST_SUFFIX)


def torchtune_yaml_path(output: Path) -> Path:
    return output.with_name(output.name + TORCHTUNE_SUFFIX)


def fingerprint(
    checkpoint: DcpCheckpoint, output_format: str, export_dtype: str, model: dict[str, Any]
) -> dict[str, Any]:
    """Identifies a conversion: the same fingerprint means the same output bytes.

    Every file the output is read from is identified by its size and modification time
    (``st_mtime_ns``), taken before its tensors are read: a file rewritten in place, even to the
    same size, has a new mtime, so the next run converts again. That costs one ``stat`` per
    file, whatever the checkpoint's size; the small ``.metadata`` is also hashed."""
    md = checkpoint.metadata_path
    files = {}
    for path in (md, *checkpoint.shard_sizes):
        st = path.stat()
        files[path.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {
        "step_dir": str(checkpoint.step_dir.resolve()),
        "metadata_sha256": sha256_file(md),
        "files": files,
        "output_format": output_format,
        "export_dtype": export_dtype,
        "model": model,
        "converter": package_versions()["titan2tune"],
    }


def read_manifest(output: Path, staged: bool = False) -> dict[str, Any] | None:
    """The manifest of ``output`` (the staged one, not yet published, if ``staged``), or None
    if it is missing or unreadable."""
    path = staging_path(manifest_path(output)) if staged else manifest_path(output)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describes(manifest: dict[str, Any] | None, output: Path) -> bool:
    """Whether ``manifest`` was written for the file now at ``output``: same size and sha256."""
    try:
        recorded = manifest["output"] if manifest else None
        return bool(
            recorded
            and recorded["bytes"] == output.stat().st_size
            and recorded["sha256"] == sha256_file(output)
        )
    except (KeyError, TypeError):
        return False


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    *,
    experiment: str,
    step: int,
    checkpoint: DcpCheckpoint,
    plan: Plan,
    written: Path,
    output: Path,
    output_sha256: str,
    output_format: str,
    export_dtype: str,
    durations: dict[str, float],
    config: dict[str, Any],
    fingerprint: dict[str, Any],
    slurm: dict[str, Any] | None,
    source_sha256: dict[Path, str],
) -> dict[str, Any]:
    """``written`` is the finished file, still under its temporary name; ``output`` its name.
    ``source_sha256`` holds the digest of each source file (see :class:`SourceHasher`)."""
    out_bytes = written.stat().st_size
    sources = {checkpoint.metadata_path: checkpoint.metadata_path.stat().st_size}
    sources.update(checkpoint.shard_sizes)
    return {
        "experiment": experiment,
        "source": {
            "checkpoint_dir": str(checkpoint.step_dir.parent),
            "step": step,
            "step_dir": str(checkpoint.step_dir),
            "generation": plan.generation,
            "kind": "weights_only" if plan.weights_only else "full",
            # Every file the conversion read: DCP itself keeps no checksums.
            "files": {
                p.name: {"bytes": size, "sha256": source_sha256[p]} for p, size in sources.items()
            },
        },
        "output": {
            "path": str(output),
            "format": output_format,
            "checkpointer": keymaps.CHECKPOINTERS[output_format],
            "dtype": export_dtype,
            "tensors": len(plan.tensors),
            "parameters": sum(math.prod(t.shape) for t in plan.tensors),
            "bytes": out_bytes,
            "sha256": output_sha256,
        },
        "converted": {t.name: sorted({p.source for p in t.pieces}) for t in plan.tensors},
        "dropped": {d.key: d.reason for d in plan.dropped},
        "dropped_summary": dict(Counter(d.reason for d in plan.dropped)),
        # Settings the checkpoint cannot confirm (head counts): what to check if logits differ.
        "assumptions": plan.assumptions,
        "durations_s": {k: round(v, 3) for k, v in durations.items()},
        "slurm": slurm,
        "config": config,
        "versions": package_versions(),
        "fingerprint": fingerprint,
    }


def staging_path(path: Path) -> Path:
    """The temporary name :func:`stage` writes ``path`` under."""
    return path.with_name(f".{path.name}.partial")


def stage(path: Path, text: str) -> Path:
    """Writes and syncs ``text`` under ``path``'s temporary name, which it returns: renaming
    that to ``path`` then publishes the file in one atomic step."""
    tmp = staging_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, text: str) -> None:
    """Writes a small file so that readers see the old or the new contents, never a part."""
    tmp = stage(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torchtune_snippet(output: Path, output_format: str, model: ModelConfig, experiment: str) -> str:
    """A ``checkpointer:`` section (and a ``model:`` builder, when the model config has the
    architecture) to paste into a torchtune recipe config."""
    checkpointer = {
        "_component_": keymaps.CHECKPOINTERS[output_format],
        "checkpoint_dir": str(output.parent),
        "checkpoint_files": [output.name],
        # torchtune refuses an output_dir inside checkpoint_dir (check_outdir_not_in_ckptdir),
        # so it goes in a sibling folder, one subfolder per output: two outputs converted
        # into one folder do not share where torchtune saves.
        "output_dir": str(output.parent.with_name(f"{output.parent.name}_torchtune") / output.stem),
        # LLAMA3_2 is torchtune's model type for tied embeddings (no output.weight).
        "model_type": "LLAMA3_2" if model.tied_embeddings else "LLAMA3",
    }
    doc: dict[str, Any] = {"checkpointer": checkpointer}
    builder = model_builder(model)
    if builder is not None:
        doc["model"] = builder
    header = (
        f"# torchtune recipe sections for {output.name} (experiment {experiment}),\n"
        "# written by titan2tune. Paste them into a recipe config, or instantiate them with\n"
        "# torchtune.config.instantiate. output_dir is where torchtune writes its own saves.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


def model_builder(model: ModelConfig) -> dict[str, Any] | None:
    """torchtune's llama3-family component builder with the model's dimensions, if known."""
    dims = (model.dim, model.n_layers, model.vocab_size, model.hidden_dim)
    if any(d is None for d in dims):
        return None
    args: dict[str, Any] = {
        "vocab_size": model.vocab_size,
        "num_layers": model.n_layers,
        "num_heads": model.n_heads,
        "num_kv_heads": model.kv_heads,
        "embed_dim": model.dim,
        "max_seq_len": model.max_seq_len,
        "intermediate_dim": model.hidden_dim,
        "norm_eps": model.norm_eps,
        "rope_base": model.rope_theta,
    }
    if model.tied_embeddings:
        # llama3_2's builder ties the output projection to the embeddings; it applies
        # Llama 3.1-style RoPE scaling with scale_factor 32 by default, torchtitan uses 8.
        component = "torchtune.models.llama3_2._component_builders.llama3_2"
        args["tie_word_embeddings"] = True
        args["scale_factor"] = 8
    elif model.rope_scaling:
        component = "torchtune.models.llama3_1._component_builders.llama3_1"
        args["scale_factor"] = 8
    else:
        component = "torchtune.models.llama3._component_builders.llama3"
    return {"_component_": component, **args}
