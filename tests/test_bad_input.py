"""Bad input through the command line: nothing the user owns is lost, nothing hangs, no traceback.

Every case ends in one `error:` line and exit code 2 (or works where working is right), and leaves
the folders it was pointed at as they were. Refusals happen before calibration where they can.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cli_helpers import CLI, REPO, TINY_MASK, call_main, one_error, tiny_artifact
from repq_export import cli
from repq_export.commands import test_tool
from repq_export.commands.common import Terminated, _raise_terminated
from repq_export.artifact.folder import ARTIFACT, record_added_file
from repq_export.artifact.manifest_check import FORMAT
from repq_export.output_dir import remove_stale_temporaries, staged_dir
from repq_export.resources import DEPLOY_CONFIGS_DIR


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes: to see that nothing was deleted, changed or left behind."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture()
def work(tmp_path, art) -> Path:
    """A user's folder: a checkpoint, calibration images and a file of theirs."""
    shutil.copy(art.ckpt, tmp_path / "m.pth")
    shutil.copytree(art.img_dir, tmp_path / "calib")
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    return tmp_path


def export(work: Path, *extra, out="out", ckpt="m.pth", calib="calib", bits=("--bits", 4)) -> list:
    """An export command line over `work` (relative paths are taken there); a random checkpoint is no accurate
    model, so its calibration check's verdict does not stop the export."""
    return ["--ckpt", work / ckpt, "--config", TINY_MASK, *bits, "--calib", work / calib, "--out",
            out if isinstance(out, Path) else work / out, "--quiet", "--accept-accuracy-loss", *extra]


# ------------------------------------------------------------------ 1. --force never deletes what is not ours


@pytest.mark.parametrize("where", [".", "..", "cwd", "ancestor", "victim/.."])
def test_force_refuses_the_current_folder_and_above(work, where, capsys, monkeypatch):
    sub = work / "sub" / "deeper"
    sub.mkdir(parents=True)
    (work / "victim").mkdir()
    monkeypatch.chdir(sub)
    out = {".": Path("."), "..": Path(".."), "cwd": sub, "ancestor": work, "victim/..": work / "victim/.."}[where]
    before = tree(work)
    result = call_main(cli.main, export(work, "--force", out=out), capsys)
    one_error(result, "--out")
    assert "calibrating" not in result.out and tree(work) == before


def test_force_keeps_a_folder_that_is_not_an_artifact(work, capsys):
    (work / "out").mkdir()
    (work / "out" / "thesis.tex").write_text("years of work\n")
    before = tree(work)
    one_error(call_main(cli.main, export(work, "--force"), capsys), "not an artifact", "left alone")
    assert tree(work) == before


def test_force_keeps_an_artifact_holding_a_users_file(work, art, capsys):
    shutil.copytree(art.path, work / "out")
    (work / "out" / "my_results.csv").write_text("1,2,3\n")
    before = tree(work)
    one_error(call_main(cli.main, export(work, "--force"), capsys), "my_results.csv", "did not write")
    assert tree(work) == before


def test_out_is_a_file(work, capsys):
    before = tree(work)
    line = one_error(call_main(cli.main, export(work, out="notes.txt"), capsys), "notes.txt", "is a file")
    assert "--force" not in line and tree(work) == before
    one_error(call_main(cli.main, export(work, "--force", out="notes.txt"), capsys), "is a file")
    assert tree(work) == before


def test_force_replaces_an_artifact_and_leaves_no_temporary(work, art, capsys):
    shutil.copytree(art.path, work / "out")
    (work / "out" / "parity_ort.json").write_text("{}\n")  # the demo writes these into an artifact, and records them
    record_added_file(work / "out", work / "out" / "parity_ort.json")
    old = (work / "out" / "repq.json").read_bytes()
    result = call_main(cli.main, export(work, "--force", "--calib-images", 2), capsys)
    assert result.rc == 0, result.err
    assert {p.name for p in (work / "out").iterdir()} == {"model.onnx", "quant.pth", "repq.json"}
    assert (work / "out" / "repq.json").read_bytes() != old  # two calibration images now
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []
    assert (work / "notes.txt").read_text() == "the user's own file\n"


# ------------------------------------------------------------------ 2. SIGTERM, stale temporaries


def test_sigterm_removes_the_temporary_folder(work):
    # The signal is sent as soon as the temporary folder appears; on a loaded machine the tiny export
    # can still finish first (exit 0, artifact complete). Up to 3 tries; every try leaves no temporary.
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, *CLI, *map(str, export(work, "--force"))], cwd=REPO, text=True,
                                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not list(work.glob(".out.tmp*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the export ended before its temporary folder was seen"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert not [p.name for p in work.iterdir() if p.name.startswith(".")], "a temporary was left"
        if proc.returncode == 0:  # finished before the signal: a complete artifact, tried again
            assert (work / "out" / "repq.json").is_file()
            continue
        assert proc.returncode == 143, err[-2000:]
        assert "Traceback" not in err and "terminated" in err
        names = sorted(p.name for p in work.iterdir())
        assert names in (["calib", "m.pth", "notes.txt"], ["calib", "m.pth", "notes.txt", "out"]), names
        return
    pytest.fail("in 3 tries the export always finished before SIGTERM arrived")


def test_a_signal_right_after_the_temporary_folder_is_made_removes_it(tmp_path, monkeypatch):
    # The window the SIGTERM test hits only by luck: the folder exists, the work has not started.
    made = Path.mkdir

    def mkdir_then_terminated(self, *args, **kwargs):
        made(self, *args, **kwargs)
        raise Terminated()

    monkeypatch.setattr(Path, "mkdir", mkdir_then_terminated)
    with pytest.raises(Terminated):
        with staged_dir(tmp_path / "out", force=False, kind=ARTIFACT):
            pass
    assert list(tmp_path.iterdir()) == []


def test_signals_are_held_while_the_artifact_is_swapped(tmp_path, monkeypatch):
    # SIGTERM sent between the two renames (old artifact aside, new one in) is raised only after both.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "repq.json").write_text(json.dumps({"format": FORMAT}))  # an earlier artifact
    real_replace = os.replace
    sent = []

    def replace_with_signal(src, dst):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        real_replace(src, dst)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):
            with staged_dir(tmp_path / "out", force=True, kind=ARTIFACT) as tmp:
                (tmp / "repq.json").write_text(json.dumps({"format": FORMAT, "new": 1}))
                monkeypatch.setattr(os, "replace", replace_with_signal)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent and json.loads((tmp_path / "out" / "repq.json").read_text())["new"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".out.tmp{pid}"
    stale.mkdir()
    (stale / "quant.pth").write_bytes(b"x" * 1000)
    (stale / ".quant.pth.tmp1").write_bytes(b"x")
    users = tmp_path / f".out.tmp{pid + 100000}"  # not alive either, but holds a file we never write
    users.mkdir()
    (users / "diary.txt").write_text("mine\n")
    alive = tmp_path / f".out.tmp{os.getppid()}"  # a running process: its run may go on
    alive.mkdir()
    other = tmp_path / f".other.tmp{pid}"  # another --out's: not ours to judge now
    other.mkdir()
    assert remove_stale_temporaries(tmp_path / "out", ARTIFACT) == [stale.resolve()]
    assert not stale.exists() and users.is_dir() and alive.is_dir() and other.is_dir()


def test_export_cleans_a_stale_temporary(work, capsys):
    stale = work / f".out.tmp{dead_pid()}"
    stale.mkdir()
    (stale / "quant.pth").write_bytes(b"half written")
    result = call_main(cli.main, export(work), capsys)
    assert result.rc == 0, result.err
    assert not stale.exists() and (work / "out" / "repq.json").is_file()


# ------------------------------------------------------------------ 3. configs: bounded, one line


CONFIGS = {
    "tower of powers": ("a = 10 ** 64\nb = a ** 64\nc = b ** 64\nd = c ** 64\ne = d ** 64\n", "exponent too large"),
    "product of big ints": ("a = 2 ** 200\nb = a * a * a * a\n", "too large"),
    "string repetition": ("a = 'x' * 10000\nb = a * 10000\nc = b * 10000\n", "repetition too large"),
    "list of lists": ("a = [0] * 1000\nb = [a] * 1000\nc = [b] * 1000\n", "repetition too large"),
    "string formatting": ("a = '%*d' % (10 ** 8, 1)\n", "string formatting"),
    "20000 nested brackets": ("a = " + "[" * 20000 + "]" * 20000 + "\n", "bad.py"),
    "20000 nested minus signs": ("a = " + "-" * 20000 + "1\n", "nested too deeply"),
    "20000 nested names": ("a = []\n" + "a = [a]\n" * 20000, "nested more than"),
    "20000 nested dicts": ("a = " + "dict(b=" * 20000 + "1" + ")" * 20000 + "\n", "bad.py"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_hostile_config_ends_in_one_line(work, case, capsys):
    source, fragment = CONFIGS[case]
    (work / "bad.py").write_text(source)
    start = time.monotonic()
    result = call_main(cli.main, ["--ckpt", work / "m.pth", "--config", work / "bad.py", "--bits", 4, "--calib",
                                  work / "calib", "--out", work / "out", "--quiet"], capsys)
    one_error(result, "bad.py", fragment)
    assert time.monotonic() - start < 30
    assert not (work / "out").exists()


def test_missing_base_names_the_config_that_refers_to_it(work, capsys):
    (work / "child.py").write_text("_base_ = ['parent_missing.py']\nx = 1\n")
    argv = ["--ckpt", work / "m.pth", "--config", work / "child.py", "--bits", 4, "--calib", work / "calib",
            "--out", work / "out"]
    one_error(call_main(cli.main, argv, capsys), "parent_missing.py", "config file not found", "child.py")


# ------------------------------------------------------------------ 4. tracebacks that became one line


@pytest.fixture()
def nan_ckpt(work) -> Path:
    ckpt = torch.load(work / "m.pth", weights_only=True)
    ckpt["state_dict"]["roi_head.bbox_head.fc_cls.weight"][0, 0] = float("nan")
    ckpt["state_dict"]["backbone.patch_embed.proj.weight"][0, 0, 0, 0] = float("inf")
    torch.save(ckpt, work / "nan.pth")
    return work / "nan.pth"


def test_nan_weights_refused_at_load(work, art, nan_ckpt, capsys):
    before = tree(work)
    one_error(call_main(cli.main, export(work, ckpt="nan.pth"), capsys), "nan.pth", "NaN/Inf",
              "backbone.patch_embed.proj.weight")
    assert tree(work) == before
    one_error(call_main(test_tool.main, [TINY_MASK, nan_ckpt, "--ann", art.ann, "--img-dir", art.img_dir,
                                         "--quiet"], capsys), "NaN/Inf")


def thin_image(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "thin.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (16, 20000, 3), dtype=np.uint8))
    return path


def test_thin_image_in_export_and_predict(work, art, capsys):
    shutil.rmtree(work / "calib")
    image = thin_image(work / "calib")
    one_error(call_main(cli.main, export(work), capsys), "thin.png", "20000x16", "shrinks to nothing")
    one_error(call_main(cli.main, ["predict", art.path, image, "--save", work / "p.png"], capsys),
              "thin.png", "shrinks to nothing")
    assert not (work / "out").exists() and not (work / "p.png").exists()


def test_demo_refuses_bad_folders_and_bits_at_once(work, capsys):
    one_error(call_main(cli.main, ["demo", "--work-dir", work / "notes.txt"], capsys), "--work-dir", "is a file")
    one_error(call_main(cli.main, ["demo", "--work-dir", work / "notes.txt" / "sub"], capsys), "is a file")
    (work / "rows").mkdir()
    one_error(call_main(cli.main, ["demo", "--work-dir", work / "d", "--json-out", work / "rows"], capsys),
              "--json-out", "is a folder")
    one_error(call_main(cli.main, ["demo", "--work-dir", work / "d", "--bits", 9], capsys), "--bits")
    assert not (work / "d").exists()


# ------------------------------------------------------------------ 7. refused before the expensive work


@pytest.mark.parametrize("bits, option", [(("--bits", 8), "--bits 8"), (("--w-bits", 4, "--a-bits", 8), "--a-bits 8"),
                                          (("--w-bits", 8, "--a-bits", 4), "--w-bits 8")])
def test_eight_bits_refused_by_the_tensorrt_form_before_calibration(work, bits, option, capsys):
    trt = DEPLOY_CONFIGS_DIR / "instance-seg_tensorrt-int8_dynamic-320x320-1344x1344.py"
    result = call_main(cli.main, export(work, bits=(*bits, "--deploy-config", trt)), capsys)
    one_error(result, option)
    assert "calibrating" not in result.out


def test_tools_test_output_files_checked_first(art, tmp_path, capsys):
    argv = [TINY_MASK, art.ckpt, "--ann", art.ann, "--img-dir", art.img_dir, "--quiet"]
    one_error(call_main(test_tool.main, argv + ["--out", tmp_path / "no/such/dets.json"], capsys), "--out",
              "does not exist")
    one_error(call_main(test_tool.main, argv + ["--json-out", tmp_path], capsys), "--json-out", "is a folder")


def test_checkpoint_that_is_a_folder(work, capsys):
    one_error(call_main(cli.main, export(work, ckpt="calib"), capsys), "--ckpt", "is a folder")


# ------------------------------------------------------------------ 8. messages


@pytest.mark.parametrize("name, content, fragment", [
    ("ckpt.json", b'{"state_dict": {"a": 1}}', "JSON"),
    ("p5.pth", pickle.dumps({"state_dict": {"a": [1.0]}}, protocol=5), "plain Python pickle"),
    ("empty.pth", b"", "empty file"),
    ("junk.pth", b"e" * 200, "unknown content"),
])
def test_wrong_checkpoint_files_say_what_they_are(work, name, content, fragment, capsys):
    (work / name).write_bytes(content)
    result = call_main(cli.main, export(work, ckpt=name), capsys)
    line = one_error(result, name, fragment)
    assert "weights_only" not in line and "EOFError" not in line and "KeyError" not in line


def test_missing_architecture_keys_are_listed(work, capsys):
    ckpt = torch.load(work / "m.pth", weights_only=True)
    for i in (1, 2):
        del ckpt["state_dict"][f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"]
    torch.save(ckpt, work / "noarch.pth")
    result = call_main(cli.main, ["--ckpt", work / "noarch.pth", "--bits", 4, "--calib", work / "calib", "--out",
                                  work / "out"], capsys)
    one_error(result, "2 key(s) missing", "layers.1.blocks.0", "layers.2.blocks.0")


def test_flat_calibration_image_is_blamed(work, capsys):
    shutil.rmtree(work / "calib")
    (work / "calib").mkdir()
    cv2.imwrite(str(work / "calib" / "flat.png"), np.full((1, 1, 3), 7, np.uint8))
    result = call_main(cli.main, export(work), capsys)
    one_error(result, "flat.png", "flat colour")
    assert "zero point" not in result.err and "calibrating" not in result.out


@pytest.mark.parametrize("word, hint", [("chek", "did you mean 'check'"), ("predcit", "did you mean 'predict'"),
                                        ("model.pth", "the commands are")])
def test_unknown_command(word, hint, capsys):
    line = one_error(call_main(cli.main, [word, "x"], capsys), word, hint)
    assert "--ckpt" not in line


@pytest.mark.parametrize("argv, option", [
    (["serve", "ART", "--threads", "-1"], "--threads"),
    (["serve", "ART", "--max-image-mb", "0"], "--max-image-mb"),
    (["serve", "ART", "--max-queue-delay-us", "x"], "--max-queue-delay-us"),
    (["infer", "http://127.0.0.1:1", "img.png", "--timeout", "nan"], "--timeout"),
])
def test_serving_numbers_are_checked(argv, option, capsys):
    one_error(call_main(cli.main, argv, capsys), option)


@pytest.mark.parametrize("extra, option", [(["--code-images", "-1"], "--code-images"),
                                           (["--min-match-rate", "1.5"], "--min-match-rate"),
                                           (["--ap-tolerance", "-0.1"], "--ap-tolerance")])
def test_parity_check_numbers_are_checked(extra, option, capsys):
    from repq_export.commands import parity_tool

    one_error(call_main(parity_tool.main, ["ART", "--ann", "a.json", "--img-dir", "d", *extra], capsys), option)
