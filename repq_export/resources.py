"""Where the files shipped inside the package live: model configs, deploy configs, bundled detectors.

They sit inside the package so that an installed wheel finds them exactly as a source checkout
does (the checkout's top-level ``configs/`` and ``deploy_configs/`` are links to these folders).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("repq_export")))
CONFIGS_DIR = PACKAGE_DIR / "configs"
DEPLOY_CONFIGS_DIR = PACKAGE_DIR / "deploy_configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
DEFAULT_DEPLOY_CONFIG = DEPLOY_CONFIGS_DIR / "instance-seg_onnxruntime_cpu.py"
