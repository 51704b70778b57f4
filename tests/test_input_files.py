"""Every file input is checked before it is read, through the command line.

A FIFO, a device or an over-budget file is refused at once with one line naming the option and the
file; an image is refused for its pixels from its header before decoding; a checkpoint's extra
objects (mmengine's message hub, an optimizer) are ignored, its state-dict tensors checked on entry,
and its meta never walked; messages name the file, say why, and print under any output encoding.
Commands that could hang or grow memory on a regression run in a subprocess with a short timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cli_helpers import CLI, REPO, TEST_PY, TINY_MASK, call_main, one_error, run_cli, tiny_artifact
from repq_export import cli
from repq_export.commands import test_tool
from repq_export.data.images import header_size
from repq_export.resources import MAX_ANNOTATION_BYTES, MAX_CONFIG_BYTES, MAX_PIXELS

FIFO_TIMEOUT = 90  # seconds: a command that blocks on a FIFO fails the test instead of hanging it


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture()
def work(tmp_path, art) -> Path:
    """A user's folder: a checkpoint and a folder of calibration images."""
    shutil.copy(art.ckpt, tmp_path / "m.pth")
    shutil.copytree(art.img_dir, tmp_path / "calib")
    return tmp_path


def export(work: Path, *extra, ckpt="m.pth", calib="calib") -> list:
    """An export command line over `work`."""
    return ["--ckpt", work / ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", work / calib, "--out",
            work / "out", "--quiet", "--device", "cpu", "--calib-images", 1, "--accept-accuracy-loss", *extra]


def png_bytes(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def picture(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose header declares width x height, with a few bytes of data:
    decoding it would allocate width*height*3 bytes first."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 << 16)))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------ regular files only, never blocking


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["calib image", "--deploy-config", "--calib-ann", "--config", "--ckpt"])
def test_a_fifo_given_to_export_is_refused_at_once(work, where):
    """Nothing writes to these FIFOs: a command that opened one for reading would wait forever."""
    args = export(work)
    if where == "calib image":
        shutil.rmtree(work / "calib")
        (work / "calib").mkdir()
        name = fifo(work / "calib" / "pipe.png")
    elif where == "--calib-ann":
        name = fifo(work / "ann.json")
        i = args.index("--calib")
        args[i:i + 2] = ["--calib-ann", name, "--calib-img-dir", work / "calib"]
    else:
        name = fifo(work / ("pipe.pth" if where == "--ckpt" else "pipe.py"))
        if where == "--deploy-config":
            args += ["--deploy-config", name]
        else:
            args[args.index(where) + 1] = name
    result = run_cli(CLI, *args, timeout=FIFO_TIMEOUT)
    line = one_error(result, name, "is a FIFO (named pipe), not a regular file")
    if where != "calib image":
        assert where in line
    assert "calibrating" not in result.out


def test_a_fifo_image_for_predict_and_an_annotation_fifo_for_tools_test(art, tmp_path):
    image = fifo(tmp_path / "pipe.png")
    result = run_cli(CLI, "predict", art.path, image, "--save", tmp_path / "out.png", timeout=FIFO_TIMEOUT)
    one_error(result, image, "is a FIFO")
    ann = fifo(tmp_path / "ann.json")
    result = run_cli(TEST_PY, TINY_MASK, art.ckpt, "--ann", ann, "--img-dir", art.img_dir, "--quiet",
                     timeout=FIFO_TIMEOUT)
    one_error(result, "--ann", ann, "is a FIFO")


def test_dev_zero_as_deploy_config_is_not_read(work):
    result = run_cli(CLI, *export(work, "--deploy-config", "/dev/zero"), timeout=FIFO_TIMEOUT)
    one_error(result, "--deploy-config /dev/zero", "is a character device")


@pytest.mark.parametrize("option, budget", [("--deploy-config", MAX_CONFIG_BYTES), ("--config", MAX_CONFIG_BYTES),
                                            ("--calib-ann", MAX_ANNOTATION_BYTES)])
def test_files_over_their_budget_are_refused_unread(work, option, budget, capsys):
    """A sparse file one byte over the budget: its size alone refuses it."""
    big = work / ("big.json" if option == "--calib-ann" else "big.py")
    with open(big, "wb") as f:
        f.truncate(budget + 1)
    args = export(work)
    if option == "--deploy-config":
        args += [option, big]
    elif option == "--config":
        args[args.index(option) + 1] = big
    else:
        i = args.index("--calib")
        args[i:i + 2] = [option, big]
    one_error(call_main(cli.main, args, capsys), option, big, f"over the limit of {budget:,} bytes")


def test_a_config_base_that_is_a_fifo(work):
    fifo(work / "base.py")
    (work / "child.py").write_text("_base_ = 'base.py'\n")
    args = export(work)
    args[args.index("--config") + 1] = work / "child.py"
    one_error(run_cli(CLI, *args, timeout=FIFO_TIMEOUT), "base.py", "is a FIFO")


def test_a_folder_or_missing_image_for_predict(art, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    for image, why in ((tmp_path / "folder.png", "is a folder"), (tmp_path / "absent.png", "image file not found")):
        one_error(call_main(cli.main, ["predict", art.path, image, "--save", tmp_path / "o.png"], capsys), image, why)


# ------------------------------------------------------------------ pixel budget, from the header


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
def test_header_size_is_what_opencv_decodes(ext):
    img = picture(37, 53)
    data = cv2.imencode(ext, img)[1].tobytes()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert header_size(data) == (decoded.shape[1], decoded.shape[0]) == (53, 37)


def test_a_png_declaring_30000x30000_is_refused_before_decoding(art, tmp_path):
    """In a subprocess: on a regression, decoding would take 2.7 GB, not this test's process."""
    image = tmp_path / "bomb.png"
    image.write_bytes(png_declaring(30000, 30000))
    assert image.stat().st_size < 1 << 20
    result = run_cli(CLI, "predict", art.path, image, "--save", tmp_path / "o.png", timeout=FIFO_TIMEOUT)
    one_error(result, image, "image too large", "30000x30000", f"limit of {MAX_PIXELS:,}", "--max-pixels")


def test_max_pixels_lowers_and_raises_the_budget(art, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), picture(120, 160))
    argv = [art.path, image, "--save", tmp_path / "o.png", "--backend", "quant"]
    one_error(call_main(cli.main, ["predict", *argv] + ["--max-pixels", 160 * 120 - 1], capsys), image,
              "image too large", "160x120", "--max-pixels")
    assert call_main(cli.main, ["predict", *argv] + ["--max-pixels", 160 * 120], capsys).rc == 0
    one_error(call_main(cli.main, ["predict", *argv] + ["--max-pixels", 0], capsys), "--max-pixels")


def test_max_pixels_in_export_and_tools_test(work, art, capsys):
    first = sorted((work / "calib").iterdir())[0]
    h, w = cv2.imread(str(first)).shape[:2]
    result = call_main(cli.main, export(work, "--max-pixels", h * w - 1), capsys)
    one_error(result, first.name, "image too large", "--max-pixels")
    result = call_main(test_tool.main, [TINY_MASK, art.ckpt, "--ann", art.ann, "--img-dir", art.img_dir, "--quiet",
                                        "--device", "cpu", "--max-pixels", 100], capsys)
    one_error(result, "image too large", "--max-pixels")


def test_a_bmp_declaring_a_huge_picture_is_refused(art, tmp_path, capsys):
    data = bytearray(cv2.imencode(".bmp", picture(4, 4))[1].tobytes())
    data[18:22] = (40000).to_bytes(4, "little")
    data[22:26] = (-40000).to_bytes(4, "little", signed=True)  # top-down
    image = tmp_path / "huge.bmp"
    image.write_bytes(bytes(data))
    one_error(call_main(cli.main, ["predict", art.path, image, "--save", tmp_path / "o.png"], capsys), image,
              "image too large", "40000x40000")


# ------------------------------------------------------------------ images that cannot be decoded


@pytest.mark.parametrize("ext, detail", [(".png", "truncated: the PNG file ends before its IEND chunk"),
                                         (".jpg", "truncated: the JPEG file ends before its end-of-image marker")])
def test_truncated_images_are_named_truncated(art, tmp_path, ext, detail):
    """In a subprocess: what libpng/libjpeg print on stderr must not add lines to the one error line."""
    data = cv2.imencode(ext, picture())[1].tobytes()
    image = tmp_path / f"cut{ext}"
    image.write_bytes(data[: len(data) // 2])
    line = one_error(run_cli(CLI, "predict", art.path, image, "--save", tmp_path / "o.png"), image, detail)
    assert "not a format OpenCV reads" not in line


def test_a_corrupt_png_says_what_libpng_found_in_one_line(art, tmp_path):
    data = bytearray(png_bytes(picture()))
    data[100] ^= 0xFF  # inside IDAT: its CRC no longer matches
    image = tmp_path / "corrupt.png"
    image.write_bytes(bytes(data))
    line = one_error(run_cli(CLI, "predict", art.path, image, "--save", tmp_path / "o.png"), image,
                     "a PNG file that OpenCV cannot decode")
    assert "CRC" in line


def test_text_named_png_is_not_an_image(art, tmp_path, capsys):
    image = tmp_path / "notes.png"
    image.write_text("not a picture\n")
    one_error(call_main(cli.main, ["predict", art.path, image, "--save", tmp_path / "o.png"], capsys), image,
              "not a format OpenCV reads")


# ------------------------------------------------------------------ calibration images


def test_a_near_black_calibration_image_is_blamed_before_calibrating(work, capsys):
    shutil.rmtree(work / "calib")
    (work / "calib").mkdir()
    noise = np.random.default_rng(0).random((400, 600, 3)) < 0.01
    cv2.imwrite(str(work / "calib" / "night.png"), noise.astype(np.uint8))
    result = call_main(cli.main, export(work), capsys)
    one_error(result, "night.png", "nearly one flat colour", "0..1")
    assert "quantizer" not in result.err and "calibrating" not in result.out


def test_a_dark_image_whose_calibration_cannot_be_exported_is_named(work, capsys):
    """Values 0 and 9 pass the flatness check, but give a quantizer a range without zero (seen on
    the tiny checkpoint): the message names the image and why, not only the quantizer."""
    shutil.rmtree(work / "calib")
    (work / "calib").mkdir()
    noise = np.random.default_rng(0).random((400, 600, 3)) < 0.01
    cv2.imwrite(str(work / "calib" / "dark.png"), noise.astype(np.uint8) * 9)
    result = call_main(cli.main, export(work), capsys)
    line = one_error(result, "dark.png", "too little dynamic range", "calibrate on real pictures")
    assert line.index("dark.png") < line.index("_quantizer")
    assert not (work / "out").exists()


# ------------------------------------------------------------------ file names in any encoding


def strict_utf8_run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    argv = [sys.executable, *CLI, *(os.fsencode(str(a)) for a in args)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=300)


def test_a_non_utf8_file_name_prints_under_strict_utf8_output(art, work):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    cv2.imwrite(str(work / "photo.png"), picture())
    os.rename(work / "photo.png", work / name)
    result = strict_utf8_run("predict", art.path, work / name, "--backend", "quant", cwd=work)
    out, err = result.stdout.decode("ascii"), result.stderr.decode("ascii")  # escapes, nothing else
    assert result.returncode == 0 and "Traceback" not in err, err
    assert "caf\\udce9_pred.png" in out and (work / os.fsdecode(b"caf\xe9_pred.png")).is_file()
    shutil.rmtree(work / "calib")
    (work / "calib").mkdir()
    os.rename(work / name, work / "calib" / name)
    (work / "calib" / name).write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))  # cv2.imwrite crashes on it
    result = strict_utf8_run(*export(work), cwd=work)
    err = result.stderr.decode("ascii")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and "caf\\udce9.png" in err and "flat colour" in err


# ------------------------------------------------------------------ checkpoints


def raw_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def training_checkpoint(path: Path) -> Path:
    """An mmdetection 3.x checkpoint as its Runner saves one: mmdet 3 keys, dataset_meta, and the
    training state written through mmengine itself (MessageHub's HistoryBuffers, an optimizer,
    parameter schedulers)."""
    from mmengine.logging import MessageHub
    from mmengine.optim import MultiStepLR

    from repq_export.config_source import load_config
    from repq_export.models.random_checkpoint import make_random_checkpoint

    ckpt = make_random_checkpoint(load_config(TINY_MASK), "mmdet3", seed=0)
    hub = MessageHub.get_instance("repq_export_test")
    for step, loss in enumerate((2.5, 1.75, 1.5)):
        hub.update_scalar("train/loss", loss)
        hub.update_scalar("train/lr", 1e-4 * (step + 1))
    hub.update_info("iter", 3)
    hub.update_info("epoch", 1)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler = MultiStepLR(optimizer, milestones=[8, 11], by_epoch=True)
    ckpt.update(message_hub=hub.state_dict(), optimizer=optimizer.state_dict(),
                param_schedulers=[scheduler.state_dict()])
    ckpt["meta"].update(epoch=1, iter=3, seed=0, experiment_name="mask_rcnn_tiny_20260101")
    torch.save(ckpt, path)
    return path


def test_an_mmdet3_training_checkpoint_loads_without_mmengine(tmp_path):
    path = training_checkpoint(tmp_path / "epoch_1.pth")
    with pytest.raises(Exception):  # torch alone refuses it: it holds mmengine and numpy objects
        torch.load(path, weights_only=True)
    script = ("import sys; from repq_export.models.checkpoint import load_checkpoint; "
              f"d, info = load_checkpoint({str(path)!r}); "
              "print(info.layout, list(info.classes), info.meta['epoch'], 'mmengine' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["mmdet3", "['ellipse',", "'rectangle',", "'triangle',", "'star']", "1", "False"]


def test_an_mmdet3_training_checkpoint_exports(art, tmp_path):
    path = training_checkpoint(tmp_path / "epoch_1.pth")
    result = run_cli(CLI, "--ckpt", path, "--bits", 4, "--calib", art.img_dir, "--out", tmp_path / "out", "--quiet",
                     "--device", "cpu", "--accept-accuracy-loss")
    assert result.rc == 0, result.err[-3000:]
    assert (tmp_path / "out" / "repq.json").is_file() and result.err.strip() == ""


def test_a_self_referencing_meta_costs_nothing(art, tmp_path):
    """A few bytes of pickle that a recursive copy turns into 2^40 nodes (and a list holding itself)."""
    ckpt = raw_checkpoint(art.ckpt)
    shared: list = ["leaf"]
    for _ in range(40):
        shared = [shared, shared]
    loop: list = []
    loop.append(loop)
    ckpt["meta"].update(history=shared, loop=loop, nested={"a": {"b": shared}})
    path = tmp_path / "shared.pth"
    torch.save(ckpt, path)
    assert path.stat().st_size < art.ckpt.stat().st_size + 4096
    script = ("from repq_export.models.checkpoint import load_checkpoint; "
              f"d, info = load_checkpoint({str(path)!r}); print(sorted(info.meta), len(info.classes))")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "history" not in proc.stdout and "loop" not in proc.stdout and proc.stdout.strip().endswith("4")


KEY = "rpn_head.rpn_conv.weight"
TENSORS = {
    "qint8": (lambda w: torch.quantize_per_tensor(w, 0.1, 0, torch.qint8), "quantized tensor (torch.qint8)"),
    "sparse": (lambda w: w.to_sparse(), "sparse_coo tensor"),
    "0-dim": (lambda w: torch.tensor(0.5), "0-dim scalar where a weight tensor is expected"),
    "meta": (lambda w: torch.empty(w.shape, device="meta"), "meta-device tensor"),
    "stride 0": (lambda w: torch.zeros(1).expand(10**6, 10**6), "claims 1,000,000,000,000 elements"),
    "complex": (lambda w: w.to(torch.complex64), "torch.complex64 tensor; weights must be floating point (casting "
                "would drop the imaginary part)"),
    "int64": (lambda w: w.round().long(), "torch.int64 tensor; weights must be floating point"),
    "bool": (lambda w: w > 0, "torch.bool tensor; weights must be floating point"),
    "float index": (None, "this buffer holds integers"),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_state_dict_tensors_are_checked_on_entry(work, case, capsys):
    make, fragment = TENSORS[case]
    ckpt = raw_checkpoint(work / "m.pth")
    sd = ckpt["state_dict"]
    key = KEY if make else next(k for k in sd if k.endswith("relative_position_index"))
    with warnings.catch_warnings():  # torch deprecates making quantized tensors: not what is tested
        warnings.simplefilter("ignore")
        sd[key] = make(sd[key]) if make else sd[key].float()
    torch.save(ckpt, work / "bad.pth")
    result = call_main(cli.main, export(work, ckpt="bad.pth"), capsys)
    one_error(result, "bad.pth", key, fragment)
    assert "calibrating" not in result.out


def test_integer_buffers_load_as_they_are(work, capsys):
    """relative_position_index (int64, 2-D) and num_batches_tracked (int64, 0-dim) are real buffers."""
    from repq_export.models.checkpoint import read_checkpoint

    sd, _, _ = read_checkpoint(work / "m.pth")
    assert any(k.endswith("relative_position_index") and v.dtype == torch.int64 for k, v in sd.items())
    ckpt = raw_checkpoint(work / "m.pth")
    ckpt["state_dict"]["neck.extra.num_batches_tracked"] = torch.tensor(7)
    torch.save(ckpt, work / "bn.pth")
    sd, _, _ = read_checkpoint(work / "bn.pth")  # passes the tensor checks (the model then calls it unexpected)
    assert sd["neck.extra.num_batches_tracked"].item() == 7


class _Calls:
    """A pickle that calls `func(*args)` when loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, shown", [(os.system, "os.system"), (subprocess.Popen, "subprocess.Popen"),
                                         (eval, "builtins.eval"), (exec, "builtins.exec")])
def test_a_checkpoint_that_runs_code_is_refused_naming_it(work, func, shown, capsys):
    marker = work / "pwned"
    arg = {eval: f"open({str(marker)!r}, 'w')", exec: f"open({str(marker)!r}, 'w')",
           subprocess.Popen: ["touch", str(marker)]}.get(func, f"touch {marker}")
    ckpt = raw_checkpoint(work / "m.pth")
    ckpt["meta"]["payload"] = _Calls(func, arg)
    torch.save(ckpt, work / "evil.pth")
    line = one_error(call_main(cli.main, export(work, ckpt="evil.pth"), capsys), "evil.pth", f"would call {shown}",
                     "torch.save({'state_dict': model.state_dict()}")
    assert "weights_only" not in line and "malicious" not in line and "trust the source" not in line
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n but not really, a text after the signature",
                                  b"BM is how this note starts, and it says nothing of pixels"])
def test_a_file_with_only_an_image_signature_is_not_called_too_large(art, tmp_path, data, capsys):
    image = tmp_path / "fake.png"
    image.write_bytes(data)
    line = one_error(call_main(cli.main, ["predict", art.path, image, "--save", tmp_path / "o.png"], capsys), image,
                     "cannot decode image")
    assert "too large" not in line


def test_a_calibration_failure_in_quant_names_the_images(tmp_path):
    """quant/calibrate.py reports 'calibration images: ...' without knowing the files; export and
    tools/test.py put their names in front."""
    from repq_export.data.images import blame_calibration_images
    from repq_export.errors import UserError
    from repq_export.quant.calibrate import check_float_detections

    def finds_nothing(img, img_hw):
        return (torch.zeros(0, 4),)

    with pytest.raises(UserError) as info:
        check_float_detections(finds_nothing, [(torch.zeros(1, 3, 32, 32), torch.tensor([32.0, 32.0]))])
    paths = [tmp_path / "night.png"]
    message = str(blame_calibration_images(info.value, paths))
    assert message.startswith(f"{paths[0]}: the float model detects nothing in it")
    other = UserError("--bits: something else")
    assert blame_calibration_images(other, paths) is other
