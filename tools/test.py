#!/usr/bin/env python
"""The reference's evaluation command, on any stage: float, fake quant, onnxruntime or TensorRT.

    python tools/test.py CONFIG CKPT --eval bbox segm --w_bits 4 --a_bits 4

With no bit widths it evaluates the float detector (the reference always quantizes, W4A4 by
default); `--backend ort|trt --model PATH` evaluates an exported graph or engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.commands.test_tool import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
