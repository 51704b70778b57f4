"""Write a deterministic synthetic COCO-format instance-segmentation dataset.

Four shape classes (ellipse, rectangle, triangle, star) with textures and colours on textured,
noisy backgrounds; 1..8 objects an image, occluding each other; image sides 240..520 pixels.
Output: DIR/annotations/instances_{split}.json and DIR/{split}/{id:012d}.png. The same arguments
give byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# let `python tools/make_synthetic_coco.py` run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.data.synthetic import make_synthetic_coco  # noqa: E402
from repq_export.errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", metavar="DIR", required=True, type=Path, help="output folder (created if missing)")
    add("--split", metavar="NAME", default="val", help="split name: train, val, ... (default: val)")
    add("--num-images", metavar="N", type=int, default=100, help="number of images (default: 100)")
    add("--seed", metavar="S", type=int, default=0, help="random seed, >= 0 (default: 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit code (2 on bad input)."""
    args = parse_args(argv)
    try:
        ann_file = make_synthetic_coco(args.out, args.split, args.num_images, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(ann_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
