"""The demo's experiments: real torchtitan-layout DCP checkpoints for the three experiments
of ``conf/experiment/`` (two gloo ranks, FSDP2-sharded, a full training save and a weights-only
save each), into ``<out>/checkpoint_<name>/``. It is a step of its own, run by name
(``python -m demo --out outputs``): the converter never writes demo data in place of a missing
checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from demo.writer import (
    TORCHTITAN_0_3,
    ModelShape,
    StepKind,
    StepSpec,
    meta_shapes,
    peak_rss_mib,
    reference_weights,
    save_weights,
    write_steps_from_files,
)

# name -> (shape, layout, [StepKind, ...]); conf/experiment/<name>.yaml describes the same.
DEMO_EXPERIMENTS: dict[str, tuple[ModelShape, str, list[StepKind]]] = {
    # torchtitan llama3 "debugmodel" as shipped in torchtitan 0.3.0.
    "debug": (
        ModelShape(dim=256, n_layers=6, n_heads=16, n_kv_heads=16, vocab_size=2048, hidden_dim=768),
        TORCHTITAN_0_3,
        [(10, "full", torch.float32), (20, "weights_only", torch.bfloat16)],
    ),
    "500M": (
        ModelShape(
            dim=1280, n_layers=24, n_heads=20, n_kv_heads=4, vocab_size=32768, hidden_dim=3456
        ),
        "#1347",
        [(1000, "full", torch.float32), (2000, "weights_only", torch.bfloat16)],
    ),
    "debug_pretrained": (
        ModelShape(
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=2,
            vocab_size=2048,
            hidden_dim=768,
            tied_embeddings=True,
        ),
        "#2937 fuse_qkv",
        [(5, "full", torch.float32), (10, "weights_only", torch.float32)],
    ),
}


def _disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _param_bytes(shape: ModelShape) -> int:
    """float32 bytes of one copy of the model's weights (tied embeddings stored once)."""
    sizes = meta_shapes(shape)
    if shape.tied_embeddings:
        del sizes["output.weight"]
    return 4 * sum(math.prod(size) for size in sizes.values())


def _round_bytes(
    steps: Sequence[tuple[str, StepKind]],
) -> tuple[int, int]:
    """Bytes one round adds under the output root for good, and the most it holds in the
    temporary folder meanwhile (a float32 weights file per step, and a full step's parameter
    shards, which the driver reads back)."""
    kept = temporary = 0
    for name, (_, kind, dtype) in steps:
        params = _param_bytes(DEMO_EXPERIMENTS[name][0])
        temporary += params * (2 if kind == "full" else 1)
        # A full save is float32 parameters and AdamW's two moments.
        kept += 3 * params if kind == "full" else params * dtype.itemsize // 4
    return kept, temporary


def _check_free_space(out_root: Path, rounds: list[list[tuple[str, StepKind]]]) -> None:
    """Refuse to start a demo that cannot fit on the disk: DCP reports a full disk from deep
    inside torch.save, long after the first gigabytes are written."""
    out_root.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.gettempdir())
    same_disk = os.stat(out_root).st_dev == os.stat(tmp_root).st_dev
    kept = peak = peak_tmp = 0
    for steps in rounds:
        round_kept, round_tmp = _round_bytes(steps)
        kept += round_kept
        peak = max(peak, kept + (round_tmp if same_disk else 0))
        peak_tmp = max(peak_tmp, round_tmp)
    # The sweep then writes about one weights-only copy per experiment.
    names = {name for steps in rounds for name, _ in steps}
    peak = max(peak, kept + sum(_param_bytes(DEMO_EXPERIMENTS[n][0]) // 2 for n in names))
    needs = [(out_root, peak)] + ([] if same_disk else [(tmp_root, peak_tmp)])
    for folder, needed in needs:
        free = shutil.disk_usage(folder).free
        if free < needed * 1.05:
            raise SystemExit(
                f"The demo needs about {needed / 2**30:.1f} GiB free on the disk of {folder} "
                f"(its checkpoints, temporary files and the sweep's outputs); "
                f"{free / 2**30:.1f} GiB are free. This is the machine's disk, not a fault in "
                "the data: free some space, point --out (or TMPDIR) at a larger disk, or leave "
                "out the 500M experiment's full save (about 5.6 GiB) with --skip-full 500M."
            )


def write_demo(
    out_root: Path,
    experiments: Sequence[str] = ("debug", "500M", "debug_pretrained"),
    *,
    skip_full: Sequence[str] = (),
) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Write ``out_root/checkpoint_<name>/step-<N>`` for each experiment of DEMO_EXPERIMENTS.

    Each later step is saved from the weights the earlier full step trained, as in a real run
    whose final weights-only save follows its intermediate full checkpoints. The weights stay in
    a mapped file between steps, so the driver holds no copy while the ranks run.
    ``skip_full`` names experiments whose full saves are left out (the 500M one is ~6 GB); their
    weights-only saves then hold the untrained reference weights.

    Returns name -> {step: Meta-keyed tensors as saved}, for tests to compare against.
    """
    out_root = Path(out_root)
    unknown = [n for n in (*experiments, *skip_full) if n not in DEMO_EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; known: {sorted(DEMO_EXPERIMENTS)}")
    saved: dict[str, dict[int, dict[str, torch.Tensor]]] = {name: {} for name in experiments}
    total_start = time.perf_counter()
    weights = {
        # A stable seed per experiment, whatever the order asked for.
        name: reference_weights(
            DEMO_EXPERIMENTS[name][0], seed=1000 + list(DEMO_EXPERIMENTS).index(name)
        )
        for name in experiments
    }
    # Round r writes every experiment's r-th step with one start of the ranks; a later step
    # saves the weights that the earlier full step trained, as in a real run.
    rounds = [
        [
            (name, DEMO_EXPERIMENTS[name][2][r])
            for name in experiments
            if r < len(DEMO_EXPERIMENTS[name][2])
            and not (DEMO_EXPERIMENTS[name][2][r][1] == "full" and name in skip_full)
        ]
        for r in range(max(len(DEMO_EXPERIMENTS[name][2]) for name in experiments))
    ]
    _check_free_space(out_root, rounds)
    with tempfile.TemporaryDirectory(prefix="titan2tune-weights-") as tmp:
        for r, steps in enumerate(rounds):
            batch = []
            for name, (step, kind, dtype) in steps:
                shape, layout, _ = DEMO_EXPERIMENTS[name]
                weights_file = Path(tmp) / f"{name}_{r}.pt"
                save_weights(weights[name], shape, weights_file)
                step_dir = out_root / f"checkpoint_{name}" / f"step-{step}"
                batch.append(
                    (name, step, StepSpec(step_dir, weights_file, shape, layout, kind, dtype))
                )
            if not batch:
                continue
            for (name, step, spec), (tensors, stats) in zip(
                batch, write_steps_from_files([b[2] for b in batch], world_size=2), strict=True
            ):
                if spec.kind == "full":
                    weights[name] = tensors
                saved[name][step] = tensors
                ranks = ", ".join(
                    f"{v:.0f}" for k, v in stats.items() if k.endswith("_peak_rss_mib")
                )
                dtype_name = str(spec.export_dtype).removeprefix("torch.")
                print(
                    f"wrote {spec.step_dir} [{name}: layout {spec.layout} {spec.kind} {dtype_name}]"
                    f" {_disk_usage(spec.step_dir) / 2**20:.1f} MiB"
                    f" (peak RSS MiB per rank: {ranks})",
                    flush=True,
                )
            for _, _, spec in batch:
                spec.weights_file.unlink()  # on a small disk, the next round needs the room
    print(
        f"done in {time.perf_counter() - total_start:.0f} s: "
        f"{_disk_usage(out_root) / 2**30:.2f} GiB under {out_root}; "
        f"driver peak RSS {peak_rss_mib():.0f} MiB"
    )
    return saved
