"""`torchrun --nproc-per-node 2 tools/test.py ...` on the CPU (gloo): rank 0 calibrates, the quantization
state is broadcast, each process runs a share of the images, rank 0 scores them: the metrics JSON and the
detections equal one process's, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import REPO, TEST_PY, TINY_MASK, make_checkpoint, make_coco

TORCHRUN = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ann, img_dir = make_coco(root / "coco", num_images=5)  # an odd count: the shards differ in size
    return {"root": root, "ckpt": make_checkpoint(root / "tiny.pth"), "ann": ann, "img_dir": img_dir}


def tool_args(setup, *extra) -> list[str]:
    return [str(a) for a in (TINY_MASK, setup["ckpt"], "--ann", setup["ann"], "--img-dir", setup["img_dir"],
                             "--w_bits", 4, "--a_bits", 4, "--device", "cpu", "--quiet", *extra)]


def run(prefix: tuple, args: list[str]) -> subprocess.CompletedProcess:
    # one thread per process in both runs: torch's CPU kernels round differently with another thread
    # count, and torchrun gives each process one thread unless told otherwise
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *prefix, *TEST_PY, *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_write_the_metrics_of_one(setup):
    root = setup["root"]
    one = run((), tool_args(setup, "--json-out", root / "one.json", "--out", root / "one_dets.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(TORCHRUN + (free_port(),), tool_args(setup, "--json-out", root / "two.json", "--out",
                                                   root / "two_dets.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "5 images (2 processes)" in two.stdout
    assert two.stdout.count("Evaluating bbox") == 1  # rank 0 alone reports
    assert (root / "two.json").read_text() == (root / "one.json").read_text()
    assert (root / "two_dets.json").read_text() == (root / "one_dets.json").read_text()
    metrics = json.loads((root / "two.json").read_text())
    assert metrics["images"] == 5 and "segm_mAP" in metrics
    dets = json.loads((root / "two_dets.json").read_text())
    assert {d["image_id"] for d in dets["bbox"]} == {1, 2, 3, 4, 5}


def test_a_failure_on_rank_0_ends_every_rank(setup):
    """A bad --load-quant is found on rank 0; rank 1 hears of it instead of waiting for a state forever."""
    bad = setup["root"] / "not_a_state.pth"
    bad.write_bytes(b"garbage")
    result = run(TORCHRUN + (free_port(),), tool_args(setup, "--load-quant", bad))
    assert result.returncode != 0
    assert "not_a_state.pth" in result.stderr and "rank 0 stopped" in result.stderr
