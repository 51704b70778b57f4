#!/usr/bin/env python
"""Print the quantizer assignment of a config's detector: one row per quantizer, then counts.

    python tools/print_quant_table.py configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py
    python tools/print_quant_table.py configs/tiny/mask_rcnn_tiny.py --w-bits 6 --a-bits 6 --counts-only

The table is the one ``repq_export.quant.assign.quantize_modules`` produces (no weights needed,
no calibration runs; per-channel activation quantizers become per-tensor after reparameterization).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.config_source import load_config  # noqa: E402
from repq_export.errors import UserError  # noqa: E402
from repq_export.models.build import build_detector  # noqa: E402
from repq_export.quant.assign import check_bits, quant_counts, quant_table, quantize_modules  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="an mmdet-style config file")
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    parser.add_argument("--a-bits", type=int, default=4, help="activation bits, 2..8 (default 4)")
    parser.add_argument("--counts-only", action="store_true", help="print only the counts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        w_bits, a_bits = check_bits("--w-bits", args.w_bits), check_bits("--a-bits", args.a_bits)
        detector = build_detector(load_config(args.config))
        quantize_modules(detector, w_bits, a_bits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = quant_table(detector)
    if not args.counts_only:
        width = max(len(e.name) for e in table)
        for e in table:
            print(f"{e.name:<{width}}  {e.kind:<9}  {e.bits}-bit  {e.granularity}")
        print()
    for key, n in quant_counts(table).items():
        print(f"{n:5d}  {key}")
    print(f"{len(table):5d}  quantizers in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
