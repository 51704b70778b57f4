"""Shared by the command-line tests: running a command as a user does, and the small inputs they need.

The tiny artifact is made once per pytest session (it costs a calibration and an ONNX export, about
half a minute here) by the command line itself, with --engine where TensorRT is available (elsewhere
--engine is refused before any work, see test_cli.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MASK = REPO / "configs/tiny/mask_rcnn_tiny.py"
CLI = ("-m", "repq_export.cli")
TEST_PY = (str(REPO / "tools/test.py"),)
PARITY_PY = (str(REPO / "tools/parity_check.py"),)


@dataclass
class Result:
    """What a finished command left: exit code and its two streams."""

    rc: int
    out: str
    err: str


def run_cli(command: tuple[str, ...], *args, cwd: Path | None = None, timeout: int = 600) -> Result:
    """Run `python <command> args...` in a fresh interpreter, as a user's shell would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *command, *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def call_main(main, argv: list, capsys) -> Result:
    """Run a command's `main(argv)` in this process (what the console script does, minus the imports)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse ends usage errors this way
        rc = exc.code
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


def one_error(result: Result, *names) -> str:
    """Exit code 2, one stderr line `error: ...` mentioning each of `names`, no traceback."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.rc == 2, (result.rc, result.err[-2000:])
    assert "Traceback" not in result.err + result.out
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny Mask R-CNN checkpoint in the Swin-Det layout."""
    from repq_export.models.random_checkpoint import make_random_checkpoint, save_checkpoint
    from repq_export.config_source import load_config

    save_checkpoint(make_random_checkpoint(load_config(TINY_MASK), seed=seed), path)
    return path


def make_coco(folder: Path, num_images: int = 2) -> tuple[Path, Path]:
    """A synthetic COCO set: (annotation file, image folder)."""
    from repq_export.data.synthetic import make_synthetic_coco

    ann = make_synthetic_coco(folder, "val", num_images=num_images, seed=7)
    return ann, folder / "val"


@dataclass
class TinyArtifact:
    """An artifact written by `repq-export ... --engine` and what that command printed."""

    path: Path
    ckpt: Path
    ann: Path
    img_dir: Path
    export: Result


def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifact:
    """The session's tiny W4A4 artifact (made on first use, then reused by every test file)."""
    root = tmp_path_factory.getbasetemp() / "tiny_artifact_session"
    done = root / "export_result.json"
    if not done.is_file():
        root.mkdir(exist_ok=True)
        ckpt = make_checkpoint(root / "tiny_mask.pth")
        _, img_dir = make_coco(root / "coco")
        from repq_export.export.tensorrt_builder import tensorrt_available

        engine = ("--engine",) if tensorrt_available()[0] else ()  # without TensorRT --engine is refused at once
        # one calibration image, as the reference; a random checkpoint is no accurate model, so the
        # calibration check's verdict must not stop the export
        result = run_cli(CLI, "--ckpt", ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", img_dir,
                         "--calib-images", 1, "--accept-accuracy-loss", "--out", root / "artifact", *engine, "--quiet")
        if not (root / "artifact" / "repq.json").is_file():
            pytest.fail(f"repq-export could not write the tiny artifact (rc {result.rc}):\n{result.err[-3000:]}")
        done.write_text(json.dumps(vars(result)))
    return TinyArtifact(root / "artifact", root / "tiny_mask.pth", root / "coco/annotations/instances_val.json",
                        root / "coco/val", Result(**json.loads(done.read_text())))
