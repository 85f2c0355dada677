"""``python -m demo --out outputs``: the demo step (see ``demo.experiments``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from demo.experiments import DEMO_EXPERIMENTS, write_demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Write real torchtitan-layout DCP checkpoints (2 gloo ranks, FSDP2).",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output root folder")
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=["debug", "500M", "debug_pretrained"],
        choices=sorted(DEMO_EXPERIMENTS),
        help="which demo experiments to write",
    )
    parser.add_argument(
        "--skip-full",
        nargs="*",
        default=[],
        choices=sorted(DEMO_EXPERIMENTS),
        help="experiments whose full (resumable) saves are left out",
    )
    args = parser.parse_args(argv)
    write_demo(args.out, args.experiments, skip_full=args.skip_full)


if __name__ == "__main__":
    main()
