#!/usr/bin/env bash
# Install mmdetection 3.3.0 in its own virtual environment, for the optional cross-check of our
# detector against mmdetection's (tests/test_mmdet_reference.py). Nothing else needs it.
#
#   tools/install_mmdet_reference.sh VENV_DIR MMCV_WHEEL_DIR_OR_FILE
#
#   VENV_DIR                default ./.venv-mmdet (relative to the repository root)
#   MMCV_WHEEL_DIR_OR_FILE  required: an mmcv 2.1.0 wheel, or a folder holding one. mmcv 2.1.0
#                           has no Linux wheel on PyPI, so one built against torch 2.14.1 is used,
#                           installed with --no-deps so that pip does not replace torch.
#   PYTHON                  environment variable, the interpreter for the venv (default python3.11;
#                           it must match the wheel's cp tag)
#
# Then, from the repository root:
#   .venv-mmdet/bin/python -m pytest tests/test_mmdet_reference.py
#
# torch 2.14.1 is a large (CUDA) build: expect several GB of downloads or local files.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-mmdet}"
wheels="${2:-}"
python="${PYTHON:-python3.11}"

die() {
    echo "install_mmdet_reference: $*" >&2
    exit 2
}

[[ -n "$wheels" ]] || die "give an mmcv 2.1.0 wheel (or a folder holding one) as the second argument"

command -v "$python" >/dev/null 2>&1 || die "interpreter '$python' not found (set PYTHON)"
if [[ -d "$wheels" ]]; then
    shopt -s nullglob
    candidates=("$wheels"/mmcv-2.1.0-*.whl)
    shopt -u nullglob
    ((${#candidates[@]} == 1)) || die "$wheels: expected exactly one mmcv-2.1.0-*.whl, found ${#candidates[@]}"
    mmcv_wheel="${candidates[0]}"
elif [[ -f "$wheels" ]]; then
    mmcv_wheel="$wheels"
else
    die "$wheels: no such mmcv wheel file or folder"
fi
py_tag="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
[[ "$(basename "$mmcv_wheel")" == *"-$py_tag-"* ]] \
    || die "$mmcv_wheel does not match $python ($py_tag); set PYTHON to the matching interpreter"

echo "creating $venv with $python"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# Order matters: torch first (the pinned build), then mmcv without letting pip touch torch,
# then mmdet, whose requirement mmcv>=2.0.0rc4,<2.2.0 is then already met.
"${pip[@]}" --upgrade pip
"${pip[@]}" 'setuptools>=77.0.3,<81' wheel
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
# mmengine-lite: mmengine's code without its opencv-python requirement, so that the one OpenCV here is
# the headless build the project itself requires (two distributions of `cv2` overwrite each other)
"${pip[@]}" mmengine-lite==0.10.7 matplotlib opencv-python-headless
"${pip[@]}" --no-deps "$mmcv_wheel"
"${pip[@]}" packaging pillow pyyaml addict yapf  # mmcv's own requirements (skipped by --no-deps)
"${pip[@]}" mmdet==3.3.0
"${pip[@]}" pytest numpy

echo "checking the installation"
if "$venv/bin/python" -m pip list 2>/dev/null | grep -qiE '^opencv-(contrib-)?python '; then
    die "a non-headless opencv-python was installed beside opencv-python-headless; remove it"
fi
"$venv/bin/python" - <<'EOF'
import mmcv
import mmdet
import torch
from mmcv.ops import RoIAlign, nms  # the compiled ops the cross-check needs

print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}: ok")
EOF
echo "done: run '$venv/bin/python -m pytest tests/test_mmdet_reference.py' from $root"
