"""The one image loop: runners in lockstep see the same images in the same order, each image is read once
and preprocessed once per distinct setting, a torchrun rank gets its share, and a run's results keep the
dataset's ids and order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repq_export.boundary import MASK_SIZE, NetOutput
from repq_export.data.coco import CocoDataset
from repq_export.data.images import read_image
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.data.transforms import PreprocessSettings, preprocess
from repq_export.evaluation import image_loop as loop
from repq_export.evaluation.distributed import ProcessGroup

SETTINGS = PreprocessSettings(scale=(96, 64))
STATIC = dataclasses.replace(SETTINGS, pad_to=(96, 128))


class Recorder:
    """A runner that remembers what it was fed and detects one box the size of the image."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[torch.Tensor, tuple[float, float]]] = []

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        self.seen.append((img, (float(img_hw[0]), float(img_hw[1]))))
        h, w = float(img_hw[0]), float(img_hw[1])
        return NetOutput(torch.tensor([[0.0, 0.0, w, h]]), torch.tensor([0.9]), torch.tensor([0]),
                         torch.ones(1, MASK_SIZE, MASK_SIZE))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> CocoDataset:
    root = tmp_path_factory.mktemp("loop")
    return CocoDataset(make_synthetic_coco(root, "val", num_images=5, seed=3), root / "val")


@pytest.fixture
def reads(monkeypatch) -> list:
    """Every image path the loop decodes, in order."""
    paths = []

    def counting(path, *args, **kwargs):
        paths.append(path)
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(loop, "read_image", counting)
    return paths


def expected_inputs(dataset: CocoDataset, settings: PreprocessSettings, count: int) -> list[torch.Tensor]:
    return [preprocess(read_image(dataset[i][1]), **vars(settings)).tensor for i in range(count)]


def test_runners_in_lockstep_see_the_same_images_in_order(dataset, reads):
    a, b = Recorder("a"), Recorder("b")
    runs = loop.run_together([a, b], dataset, SETTINGS, 4, progress=False)
    want = expected_inputs(dataset, SETTINGS, 4)
    assert len(a.seen) == len(b.seen) == 4
    for (img_a, hw_a), (img_b, hw_b), img in zip(a.seen, b.seen, want):
        assert img_a is img_b  # one preprocessed tensor serves both
        assert torch.equal(img_a, img) and hw_a == hw_b
    assert reads == [dataset[i][1] for i in range(4)]  # each image read once, in loader order
    ids = [int(dataset[i][0]["id"]) for i in range(4)]
    assert [run.runner for run in runs] == ["a", "b"]
    assert runs[0].image_ids == runs[1].image_ids == ids
    first = runs[0].images[0]
    assert first.dets.boxes.shape == (1, 4) and first.prep.img_hw == tuple(int(v) for v in a.seen[0][1])


def test_one_preprocessing_per_distinct_setting(dataset, reads):
    dynamic, static, again = Recorder("dyn"), Recorder("static"), Recorder("again")
    images = list(loop.image_loop([dynamic, static, again], dataset, [SETTINGS, STATIC, SETTINGS], 2,
                                  progress=False))
    assert len(reads) == 2
    for image in images:
        preps = [r.prep for r in image.results]
        assert preps[0] is preps[2] and preps[1] is not preps[0]
        assert preps[1].pad_hw == (96, 128) and preps[0].img_hw == preps[1].img_hw
    assert [img.shape for img, _ in static.seen] == [(1, 3, 96, 128)] * 2
    with pytest.raises(ValueError, match="2 preprocess settings for 3 runners"):
        next(loop.image_loop([dynamic, static, again], dataset, [SETTINGS, STATIC], progress=False))


def test_a_rank_runs_its_share_and_the_shares_cover_the_set(dataset):
    shares = []
    for rank in range(2):
        group = ProcessGroup(rank, 2, rank)
        shares.append([image.index for image in loop.image_loop([Recorder("r")], dataset, SETTINGS, group=group,
                                                                progress=False)])
    assert shares == [[0, 2, 4], [1, 3]]
    whole = loop.run_sharded(Recorder("r"), dataset, SETTINGS, None, None)  # one process: the whole set, slim
    assert whole.image_ids == [int(info["id"]) for info, _ in dataset]
    assert all(r.prep is None and r.net is None and len(r.dets.scores) == 1 for r in whole.images)


def test_slim_runs_keep_the_detections_only(dataset):
    full, slim = (loop.run_dataset(Recorder("r"), dataset, SETTINGS, 3, progress=False, slim=s) for s in (False, True))
    assert slim.image_ids == full.image_ids
    for f, s in zip(full.images, slim.images):
        assert s.prep is None and s.net is None and f.prep is not None
        assert (s.dets.boxes == f.dets.boxes).all() and s.path == f.path
