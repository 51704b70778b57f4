"""The bundled detectors: they load through the loader real checkpoints take, round-trip byte for
byte through the project's writer, and detect the synthetic shapes (a broken asset fails here)."""
from __future__ import annotations

import pytest
import torch

from repq_export.commands.demo import BUNDLED
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.models.checkpoint import load_checkpoint
from repq_export.models.random_checkpoint import save_checkpoint
from repq_export.training.evaluate import evaluate_detector


@pytest.mark.parametrize("name, ckpt, config", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_bundled_checkpoint_round_trips_byte_identically(name, ckpt, config, tmp_path):
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"meta", "state_dict"} and raw["meta"]["mmdet_version"] == "2.11.0"
    assert raw["meta"]["CLASSES"] == ("ellipse", "rectangle", "triangle", "star")
    assert ckpt.stat().st_size < 32 * 2**20
    copy = save_checkpoint(raw, tmp_path / "copy.pth")
    assert copy.read_bytes() == ckpt.read_bytes()
    detector, info = load_checkpoint(copy, config)
    assert info.classes == raw["meta"]["CLASSES"]
    assert all(torch.equal(v, raw["state_dict"][k]) for k, v in detector.state_dict().items())


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled")
    return make_synthetic_coco(out, "val", 12, seed=7), out / "val"


@pytest.mark.parametrize("name, ckpt, config", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_bundled_detector_finds_the_shapes(name, ckpt, config, val_set):
    """Float AP on 12 fresh synthetic images; the 200-image figures are in docs/bundled-detectors.md."""
    detector, info = load_checkpoint(ckpt, config)
    metrics = evaluate_detector(detector, *val_set, info.preprocess, progress=False)
    assert metrics["bbox_mAP"] > 0.4 and metrics["segm_mAP"] > 0.4, metrics
