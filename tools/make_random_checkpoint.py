#!/usr/bin/env python
"""Write a random-weight checkpoint that looks exactly like a released one, for tests and demos.

    python tools/make_random_checkpoint.py --arch mask_rcnn_swin_t --out mask_rcnn_swin_t_random.pth
    python tools/make_random_checkpoint.py --config configs/tiny/mask_rcnn_tiny.py \\
        --layout mmdet3 --seed 3 --out tiny_mmdet3.pth

The work is done by ``repq_export.models.checkpoint.make_random_checkpoint`` (tests use it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.config_source import load_config  # noqa: E402
from repq_export.errors import UserError  # noqa: E402
from repq_export.models.arch import ARCHS  # noqa: E402
from repq_export.models.mmdet_config import config_from_arch  # noqa: E402
from repq_export.models.key_layout import LAYOUTS  # noqa: E402
from repq_export.models.random_checkpoint import make_random_checkpoint, save_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--arch", choices=sorted(ARCHS), help="one of the reference architectures")
    source.add_argument("--config", type=Path, help="an mmdet-style config file")
    parser.add_argument("--layout", choices=LAYOUTS, default="swin-det",
                        help="state-dict key layout: Swin-Det / mmdet 2.x or mmdet 3.x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else config_from_arch(ARCHS[args.arch])
        checkpoint = make_random_checkpoint(cfg, layout=args.layout, seed=args.seed)
        save_checkpoint(checkpoint, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.layout} layout, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
