"""Train a small Swin (Cascade) Mask R-CNN from scratch on the synthetic shapes set, on the CPU,
and write it as a Swin-Transformer-Object-Detection checkpoint. This is how the bundled
``repq_export/assets/*_swin_synthetic.pth`` were made, e.g.::

    python tools/train_synthetic.py --config configs/synthetic/mask_rcnn_swin_synthetic.py \\
        --out repq_export/assets/mask_rcnn_swin_synthetic.pth --train-dir data/synthetic --eval-dir data/synthetic
    python tools/train_synthetic.py --config configs/synthetic/cascade_mask_rcnn_swin_synthetic.py \\
        --out repq_export/assets/cascade_mask_rcnn_swin_synthetic.pth --train-dir data/synthetic \\
        --eval-dir data/synthetic --init-from repq_export/assets/mask_rcnn_swin_synthetic.pth

The train split is ``TRAIN_DIR/annotations/instances_train.json`` with images in
``TRAIN_DIR/train/``; it is generated first (``make_synthetic_coco``, 600 images, seed 1) when
missing. With ``--eval-dir`` the trained model is scored (float box / mask AP) on that folder's
``val`` split (generated when missing: 200 images, seed 2) through the project's inference path:
``preprocess``, the Detector forward at batch 1, ``postprocess``, ``evaluate_coco``.

Training saves its state to ``OUT.state`` every 50 iterations; running the same command again
after an interruption resumes from there and gives the same checkpoint as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq_export.config_source import load_config  # noqa: E402
from repq_export.data.synthetic import make_synthetic_coco  # noqa: E402
from repq_export.errors import UserError  # noqa: E402
from repq_export.models.build import build_detector  # noqa: E402
from repq_export.models.test_pipeline import preprocess_settings  # noqa: E402
from repq_export.files import file_sha256, write_atomically  # noqa: E402
from repq_export.models.random_checkpoint import config_text, save_checkpoint  # noqa: E402
from repq_export.output_dir import check_not_an_input, check_output_file  # noqa: E402
from repq_export.training.checkpoint_io import trained_checkpoint  # noqa: E402
from repq_export.training.data import TrainSet  # noqa: E402
from repq_export.training.evaluate import evaluate_detector  # noqa: E402
from repq_export.training.init import init_from_checkpoint, init_like_mmdet  # noqa: E402
from repq_export.training.settings import train_cfg_from_config  # noqa: E402
from repq_export.training.trainer import seed_everything, train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="mmdet-style config with model.train_cfg")
    p.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    p.add_argument("--train-dir", required=True, help="folder of the synthetic train split")
    p.add_argument("--iters", type=int, default=None, help="iterations (default: the config's runner.max_iters)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start backbone, neck and RPN from this checkpoint's weights (e.g. the bundled "
                        "Mask R-CNN, to train the Cascade head on top); the rest is initialised as mmdet does")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and sampling")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for reproducibility)")
    p.add_argument("--train-images", type=int, default=600, help="images of a generated train split")
    p.add_argument("--data-seed", type=int, default=1, help="seed of a generated train split")
    p.add_argument("--eval-dir", default=None, help="score on EVAL_DIR's val split after training")
    p.add_argument("--val-images", type=int, default=200, help="images of a generated val split")
    p.add_argument("--val-seed", type=int, default=2, help="seed of a generated val split")
    p.add_argument("--metrics-out", default=None, help="write the evaluation metrics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def synthetic_split(folder: Path, split: str, num_images: int, seed: int) -> Path:
    """The annotation file of a synthetic split, generated first if missing."""
    ann = folder / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        print(f"making the synthetic {split} split in {folder} ({num_images} images, seed {seed})")
        make_synthetic_coco(folder, split, num_images, seed=seed)
    return ann


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        train_cfg = train_cfg_from_config(cfg)
        iters = args.iters if args.iters is not None else train_cfg.max_iters
        if iters < 1:
            raise UserError(f"--iters: must be at least 1, got {iters}")
        metrics_out = Path(args.metrics_out) if args.metrics_out else None
        for option, path in (("--out", Path(args.out)), ("--metrics-out", metrics_out)):
            check_output_file(path, option)
        check_not_an_input({"--out": Path(args.out), "--out's .state": Path(args.out + ".state"),
                            "--metrics-out": metrics_out},
                           {"--config": Path(args.config), "--init-from": args.init_from and Path(args.init_from)})
        settings = preprocess_settings(cfg)
        train_dir = Path(args.train_dir)
        ann = synthetic_split(train_dir, "train", args.train_images, args.data_seed)
        train_set = TrainSet(ann, train_dir / "train", train_cfg.img_scale, settings.mean, settings.std,
                             settings.to_rgb, settings.size_divisor)

        seed_everything(args.seed, args.threads)
        detector = build_detector(cfg)
        init_like_mmdet(detector)
        if args.init_from:
            copied = init_from_checkpoint(detector, args.init_from)
            print(f"initialised {copied} tensors of backbone, neck and RPN from {args.init_from}")
        state = Path(args.out + ".state")
        tag = f"{Path(args.config).name} sha256:{hashlib.sha256(config_text(cfg).encode()).hexdigest()[:16]} " \
              f"iters {iters} seed {args.seed} threads {args.threads} init {args.init_from}"
        log = train(detector, train_set, train_cfg, iters, args.seed, progress=not args.no_progress,
                    state_path=state, state_tag=tag)
        minutes = log.seconds / 60
        print(f"trained {iters} iterations in {minutes:.1f} min; last loss terms: "
              + ", ".join(f"{k} {v:.3f}" for k, v in log.last_terms.items()))
        init = dict(init_from=Path(args.init_from).name, init_from_sha256=file_sha256(args.init_from)) \
            if args.init_from else {}
        checkpoint = trained_checkpoint(detector, cfg, train_set.classes, iters=iters, seed=args.seed,
                                        threads=args.threads, **init)
        save_checkpoint(checkpoint, args.out)
        state.unlink(missing_ok=True)
        print(f"wrote {args.out}")

        if args.eval_dir:
            eval_dir = Path(args.eval_dir)
            val_ann = synthetic_split(eval_dir, "val", args.val_images, args.val_seed)
            start = time.time()
            metrics = evaluate_detector(detector, val_ann, eval_dir / "val", settings, progress=not args.no_progress)
            metrics["eval_minutes"] = (time.time() - start) / 60
            print(f"val: box AP {metrics['bbox_mAP']:.3f}, mask AP {metrics['segm_mAP']:.3f}")
            if args.metrics_out:
                write_atomically(metrics_out, json.dumps(dict(metrics, train_minutes=minutes), indent=1))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
