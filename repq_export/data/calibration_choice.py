"""Which images calibrate, and which judge the calibration: evenly spread across one source.

The reference calibrates on the first image of the dataset. One image can misfit the rest of the
set (a small image with two objects gave the bundled Mask R-CNN a W8A8 model 25 box AP worse than
float), and the first N images of a set are often alike (one sequence, one camera). So N > 1 images
are taken at evenly spaced positions: ``floor(i * total / N)`` for i = 0..N-1, which starts at the
first image (N = 1 is exactly the reference's choice) and covers the set to its end. Held-out images
for the calibration check are spread the same way over the images left.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from repq_export.data.coco import CocoDataset, unscorable
from repq_export.data.images import check_calibration_image
from repq_export.errors import UserError
from repq_export.resources import MAX_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` distinct positions spread evenly over ``range(total)``, starting at 0 (all if count >= total)."""
    if total <= 0:
        return []
    count = min(count, total)
    return [i * total // count for i in range(count)]


def holdout_indices(total: int, taken: list[int], count: int) -> list[int]:
    """``count`` positions spread over ``range(total)`` that are not in ``taken`` (fewer if the set runs out)."""
    rest = [i for i in range(total) if i not in set(taken)]
    return [rest[j] for j in spread_indices(len(rest), count)]


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration images come from: a folder (``--calib``), a COCO file (``--calib-ann``, its images in
    ``--calib-img-dir`` or beside it), or paths given as they are (the demo; ``given_holdout`` then too)."""

    folder: Path | None = None
    ann: Path | None = None
    img_dir: Path | None = None
    given: tuple[Path, ...] = ()
    given_holdout: tuple[Path, ...] = ()

    def check_options(self) -> None:
        """Refuse options that would be ignored: one source only, and --calib-img-dir only with --calib-ann."""
        if self.folder is not None and self.ann is not None:
            raise UserError(f"--calib {self.folder} and --calib-ann {self.ann}: give one calibration source, not both")
        if self.img_dir is not None and self.ann is None:
            raise UserError(f"--calib-img-dir {self.img_dir}: only goes with --calib-ann (the folder of its images)")

    def candidates(self) -> list[Path]:
        """Every image calibration may take: a folder sorted by name, or a COCO file in annotation order."""
        if self.folder is not None:
            if self.folder.is_file():
                raise UserError(f"--calib {self.folder}: is a file; give the folder of calibration images")
            if not self.folder.is_dir():
                raise UserError(f"{self.folder}: calibration folder not found")
            paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                raise UserError(f"{self.folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the calibration folder")
            return paths
        dataset = self.dataset()
        if dataset is not None:
            return [dataset[i][1] for i in range(len(dataset))]
        raise UserError("calibration: give --calib DIR or --calib-ann FILE --calib-img-dir DIR")

    def dataset(self) -> CocoDataset | None:
        """The COCO file calibration draws from (its annotations score the calibration check), if any."""
        return self._coco

    @cached_property
    def _coco(self) -> CocoDataset | None:
        """`dataset`, read once: choosing the images and scoring the check ask for it several times."""
        if self.ann is None or self.folder is not None:
            return None
        if self.img_dir is not None and not self.img_dir.is_dir():
            raise UserError(f"--calib-img-dir {self.img_dir}: folder not found")
        return CocoDataset(self.ann, self.img_dir or self.ann.parent, metrics=())


def calibration_paths(source: CalibrationSource, count: int) -> list[Path]:
    """``count`` calibration images spread evenly over ``source``, starting at its first (given paths: the first
    ``count`` of them)."""
    source.check_options()
    if source.given:
        return list(source.given[:count])
    candidates = source.candidates()
    return [candidates[i] for i in spread_indices(len(candidates), count)]


def holdout_paths(source: CalibrationSource, count: int, holdout: int) -> list[Path]:
    """``holdout`` images of ``source``, spread over it and disjoint from the ``count`` calibration images."""
    if source.given or source.given_holdout:
        return list(source.given_holdout[:holdout])
    if holdout == 0:
        return []
    candidates = source.candidates()
    taken = spread_indices(len(candidates), count)
    return [candidates[i] for i in holdout_indices(len(candidates), taken, holdout)]


@dataclass(frozen=True)
class CalibrationChoice:
    """The images that calibrate, the held-out ones that also judge, and the annotations that score the judging
    (None without annotations, or where they cannot be scored: ``unscorable`` then says why)."""

    images: list[Path]
    held: list[Path]
    dataset: CocoDataset | None
    unscorable: str | None = None


def choose_calibration(source: CalibrationSource, count: int, holdout: int,
                       max_pixels: int = MAX_PIXELS) -> CalibrationChoice:
    """The calibration and held-out images of ``source``, each checked (cheap: a bad image costs no model work)."""
    images, held = calibration_paths(source, count), holdout_paths(source, count, holdout)
    for path in images + held:
        check_calibration_image(path, max_pixels)
    dataset = source.dataset()
    why = unscorable(dataset) if dataset is not None else None
    return CalibrationChoice(images, held, None if why else dataset, why)
