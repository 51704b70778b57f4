#!/usr/bin/env python
"""Parity check of an exported artifact against its fake-quant model (three tiers; exit 1 on failure).

    python tools/parity_check.py ARTIFACT_DIR --ann FILE --img-dir DIR [--backend ort|trt] --json-out FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.commands.parity_tool import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
