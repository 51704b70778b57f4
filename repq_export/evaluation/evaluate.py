"""Run any Runner over a COCO-format dataset and score it: the one evaluation path of every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..data.coco import CocoDataset
from ..data.coco_results import to_coco_results
from ..data.images import read_image
from ..data.postprocess import Detections, postprocess
from ..data.transforms import Preprocessed, PreprocessSettings, preprocess
from ..resources import MAX_PIXELS
from ..boundary import NetOutput
from ..runtime.base import Runner
from .coco_eval import evaluate_coco


@dataclass
class ImageResult:
    """One image through one runner: the raw network output and the host-side detections."""

    image_id: int
    path: Path
    prep: Preprocessed
    net: NetOutput
    dets: Detections


@dataclass
class DatasetRun:
    """All images of one runner over a dataset, in loader order."""

    runner: str
    images: list[ImageResult] = field(default_factory=list)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.images]


def run_image(runner: Runner, path: Path, settings: PreprocessSettings,
              max_pixels: int = MAX_PIXELS) -> tuple[Preprocessed, NetOutput, Detections]:
    """Read (within `max_pixels`), preprocess, run and postprocess one image."""
    prep = preprocess(read_image(path, max_pixels), **vars(settings))
    net = runner(prep.tensor, prep.img_hw_tensor)
    return prep, net, postprocess(*net, prep)


def run_dataset(runner: Runner, dataset: CocoDataset, settings: PreprocessSettings,
                max_images: int | None = None, progress: bool = True, max_pixels: int = MAX_PIXELS) -> DatasetRun:
    """Run `runner` on the first `max_images` images of `dataset` (all if None) in loader order."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    run = DatasetRun(runner.name)
    for index in tqdm(range(count), desc=f"{runner.name:>6}", unit="img", disable=not progress, leave=False):
        info, path = dataset[index]
        prep, net, dets = run_image(runner, path, settings, max_pixels)
        run.images.append(ImageResult(int(info["id"]), path, prep, net, dets))
    return run


def coco_results(run: DatasetRun, dataset: CocoDataset) -> tuple[list[dict], list[dict]]:
    """COCO result records (bbox, segm) of a run, as mmdet writes them."""
    bbox, segm = [], []
    for image in run.images:
        b, s = to_coco_results(image.dets, image.image_id, dataset.cat_ids)
        bbox += b
        segm += s
    return bbox, segm


def score_run(run: DatasetRun, dataset: CocoDataset, metrics: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """COCO AP of a run over exactly the images it ran on (fractions, mmdet's key names)."""
    bbox, segm = coco_results(run, dataset)
    return evaluate_coco(dataset.coco, bbox, segm, metrics=metrics, img_ids=run.image_ids)
