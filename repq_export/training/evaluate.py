"""COCO box / mask AP of a float ``Detector`` through the project's inference path: the image loop
(decode, ``preprocess``, the Detector forward at batch 1, ``postprocess``) and ``score_run``."""

from __future__ import annotations

from pathlib import Path

from repq_export.data.coco import CocoDataset
from repq_export.data.transforms import PreprocessSettings
from repq_export.evaluation.evaluate import score_run
from repq_export.evaluation.image_loop import run_dataset
from repq_export.models.detector import Detector
from repq_export.runtime.torch_runner import TorchRunner


def evaluate_detector(
    detector: Detector,
    ann_file: str | Path,
    img_dir: str | Path,
    settings: PreprocessSettings,
    progress: bool = True,
) -> dict[str, float]:
    """``evaluate_coco`` metrics (fractions) of ``detector`` on every image of ``ann_file``, on the device
    its weights are on."""
    dataset = CocoDataset(ann_file, img_dir)
    device = str(next(detector.parameters()).device)
    run = run_dataset(TorchRunner(detector, device, name="eval"), dataset, settings, progress=progress, slim=True)
    return score_run(run, dataset)
