"""What ``dry_run=true`` prints, and the measured rate its time estimate comes from: the last
conversion's source MB/s on this machine, kept in the user's cache folder."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from converter.models.base import Era
from converter.planned import Planned
from converter.publish import write_atomic

log = logging.getLogger("titan2tune")


def describe_plan(planned: Planned) -> str:
    """What ``dry_run=true`` prints: the layout, every output tensor and where it comes from,
    what is left out and why, the output's size, and how long it should take."""
    plan, storage = planned.plan, planned.index.storage
    lines = [
        f"{planned.name}: step-{planned.step} of {storage.display(storage.root)}",
        f"  layout: {planned.family.name} {_era(planned).describe()}, "
        f"{'weights-only' if plan.weights_only else 'full training'} checkpoint",
        f"  output: {planned.output} ({planned.fmt.name}, {planned.conf.experiment.export_dtype}),"
        f" {len(plan.tensors)} tensors, {planned.output_bytes / 1e6:.1f} MB",
    ]
    width = max((len(t.name) for t in plan.tensors), default=0)
    for t in plan.tensors:
        sources = sorted({p.source for p in t.pieces})
        how = " (rows reordered per head)" if any(p.reorder for p in t.pieces) else ""
        lines.append(
            f"    {t.name:<{width}}  {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            f"  <- {', '.join(sources)}{how}"
        )
    lines.append(f"  left out: {len(plan.dropped)} keys")
    lines += [f"    {line}" for line in plan.left_out()]
    for assumption in plan.assumptions:
        lines.append(f"  assumed: {assumption}")
    read = planned.source_bytes(plan.sources)
    rate = last_rate()
    if rate is None:
        lines.append(f"  reads {read / 1e6:.1f} MB; no conversion measured on this machine yet")
    else:
        seconds = read / 1e6 / rate["mb_per_s"]
        lines.append(
            f"  reads {read / 1e6:.1f} MB: about {seconds:.1f} s at the last measured "
            f"{rate['mb_per_s']:.0f} MB/s ({rate['experiment']}, {rate['when']})"
        )
    lines.append("  nothing was written (dry_run=true)")
    return "\n".join(lines)


def _era(planned: Planned) -> Era:
    return next(e for e in planned.family.eras if e.name == planned.plan.layout)


def _rate_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "titan2tune" / "last_rate.json"


def last_rate() -> dict[str, Any] | None:
    """The source MB/s of the last conversion on this machine (for dry_run's estimate)."""
    try:
        rate = json.loads(_rate_file().read_text())
    except (OSError, ValueError):
        return None
    # A file of another shape (edited, damaged) is no measurement: the estimate is left out.
    valid = (
        isinstance(rate, dict)
        and isinstance(rate.get("mb_per_s"), int | float)
        and rate["mb_per_s"] > 0
        and all(isinstance(rate.get(k), str) for k in ("experiment", "when"))
    )
    return rate if valid else None


def record_rate(planned: Planned, seconds: float) -> None:
    """Remembers this conversion's MB/s; a failure to write it does not fail the conversion."""
    read = planned.source_bytes(planned.plan.sources)
    if seconds <= 0 or not read:
        return
    rate = {
        "mb_per_s": read / 1e6 / seconds,
        "experiment": planned.name,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        _rate_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_rate_file(), json.dumps(rate) + "\n")
    except OSError as e:
        log.debug("Cannot record the conversion rate in %s: %s", _rate_file(), e)
