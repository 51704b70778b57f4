"""The one loop over a dataset's images: each image read once, preprocessed once per distinct setting, and
run by every given runner in lockstep; evaluation, parity, the noise floor, training and torchrun shards
all run through it, so they see the same images in the same order with the same inputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from ..boundary import NetOutput
from ..data.coco import CocoDataset
from ..data.images import read_image
from ..data.postprocess import Detections, postprocess
from ..data.transforms import Preprocessed, PreprocessSettings, preprocess
from ..errors import UserError
from ..resources import MAX_PIXELS
from ..runtime.base import Runner
from . import distributed


@dataclass
class ImageResult:
    """One image through one runner: the raw network output and the host-side detections (``prep`` and
    ``net`` are None in a slim result, which keeps only what scoring needs)."""

    image_id: int
    path: Path
    prep: Preprocessed | None
    net: NetOutput | None
    dets: Detections

    def slim(self) -> ImageResult:
        """This result without the padded input and the raw outputs (a run of thousands of images, or one
        sent between processes, keeps only the detections)."""
        return replace(self, prep=None, net=None)


@dataclass
class DatasetRun:
    """All images of one runner over a dataset, in loader order."""

    runner: str
    images: list[ImageResult] = field(default_factory=list)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.images]


@dataclass(frozen=True)
class LoopImage:
    """One image of the loop: its place in loader order and every runner's result on it, in runner order."""

    index: int
    results: list[ImageResult]


def image_count(dataset: CocoDataset, max_images: int | None) -> int:
    """How many images a run over the first ``max_images`` of ``dataset`` (all if None) covers."""
    return len(dataset) if max_images is None else min(max_images, len(dataset))


def run_prepared(runner: Runner, prep: Preprocessed) -> tuple[NetOutput, Detections]:
    """Run one preprocessed image and postprocess the network outputs."""
    net = runner(prep.tensor, prep.img_hw_tensor)
    return net, postprocess(*net, prep)


def run_image(runner: Runner, path: Path, settings: PreprocessSettings,
              max_pixels: int = MAX_PIXELS) -> tuple[Preprocessed, NetOutput, Detections]:
    """Read (within ``max_pixels``), preprocess, run and postprocess one image."""
    prep = preprocess(read_image(path, max_pixels), **vars(settings))
    return (prep, *run_prepared(runner, prep))


Settings = PreprocessSettings | Sequence[PreprocessSettings]  # one for every runner, or one per runner


def image_loop(runners: Sequence[Runner], dataset: CocoDataset, settings: Settings, max_images: int | None = None,
               *, group: distributed.ProcessGroup | None = None, progress: bool = True, desc: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Iterator[LoopImage]:
    """The first ``max_images`` images of ``dataset`` (all if None) in loader order, this process's share of
    them under a torchrun ``group``: each read once, preprocessed once per distinct setting (one ``settings``
    for all runners, or one per runner: a static-shape graph beside a dynamic one) and run by every runner,
    with one progress bar."""
    per_runner = [settings] * len(runners) if isinstance(settings, PreprocessSettings) else list(settings)
    if len(per_runner) != len(runners):
        raise ValueError(f"{len(per_runner)} preprocess settings for {len(runners)} runners")
    label = desc if desc is not None else "/".join(f"{r.name:>6}" for r in runners)
    indices = distributed.shard(image_count(dataset, max_images), group)
    for index in tqdm(indices, desc=label, unit="img", disable=not progress, leave=False):
        info, path = dataset[index]
        img = read_image(path, max_pixels)
        preps: dict[PreprocessSettings, Preprocessed] = {}
        results = []
        for runner, setting in zip(runners, per_runner):
            prep = preps.get(setting)
            if prep is None:
                prep = preps[setting] = preprocess(img, **vars(setting))
            results.append(ImageResult(int(info["id"]), path, prep, *run_prepared(runner, prep)))
        yield LoopImage(index, results)


def run_together(runners: Sequence[Runner], dataset: CocoDataset, settings: Settings, max_images: int | None = None,
                 *, progress: bool = True, desc: str | None = None, max_pixels: int = MAX_PIXELS,
                 slim: bool = False) -> list[DatasetRun]:
    """One run per runner over the same images, run in lockstep (`image_loop`); ``slim`` keeps only the
    detections of each image."""
    runs = [DatasetRun(r.name) for r in runners]
    for image in image_loop(runners, dataset, settings, max_images, progress=progress, desc=desc,
                            max_pixels=max_pixels):
        for run, result in zip(runs, image.results):
            run.images.append(result.slim() if slim else result)
    return runs


def run_dataset(runner: Runner, dataset: CocoDataset, settings: PreprocessSettings, max_images: int | None = None,
                progress: bool = True, max_pixels: int = MAX_PIXELS, slim: bool = False,
                desc: str | None = None) -> DatasetRun:
    """Run ``runner`` on the first ``max_images`` images of ``dataset`` (all if None) in loader order."""
    return run_together([runner], dataset, settings, max_images, progress=progress, desc=desc,
                        max_pixels=max_pixels, slim=slim)[0]


def run_sharded(runner: Runner, dataset: CocoDataset, settings: PreprocessSettings, max_images: int | None,
                group: distributed.ProcessGroup | None, progress: bool = False,
                max_pixels: int = MAX_PIXELS) -> DatasetRun | None:
    """This rank's share of the images run, gathered on rank 0 in loader order (None on other ranks).

    Only what scoring needs travels: each image's id, path and detections (slim results). A rank that
    fails sends its UserError instead, and rank 0 raises it for the job."""
    try:
        mine: list | str = [(image.index, image.results[0].slim()) for image in image_loop(
            [runner], dataset, settings, max_images, group=group, progress=progress, max_pixels=max_pixels)]
    except UserError as exc:
        mine = str(exc)
    parts = distributed.gather_to_main(mine, group)
    if parts is None:
        return None
    return DatasetRun(runner.name, [result for _, result in sorted(pair for part in parts for pair in part)])
