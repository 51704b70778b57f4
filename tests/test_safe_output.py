"""One output rule for every command that writes, tried through the command line.

- `triton-repo ARTIFACT OUT --force` replaces only a repository it wrote, whose files are unchanged;
  never another model repository, `.`, the artifact or a folder above it, and a full disk leaves nothing;
- `--force` on an artifact deletes only the files repq.json records, while their sha256 still matches;
- no command writes onto one of its own inputs (same path, symbolic link, hard link) or into a folder it reads;
- the demo's synthetic set appears whole or not at all, and --num-images is bounded.

Every refusal is one `error:` line, exit 2, and the folders involved keep every file with its bytes.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import CLI, PARITY_PY, REPO, TEST_PY, TINY_MASK, call_main, one_error, run_cli, tiny_artifact
from repq_export import cli, files
from repq_export.commands import parity_tool, test_tool
from repq_export.artifact.folder import record_added_file


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` with its bytes (a link: its target): to see that nothing changed or was left."""
    out: dict[str, bytes | str | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture()
def work(tmp_path, art) -> Path:
    """A user's folder: a copy of the artifact, checkpoint, annotation file, images and a file of theirs."""
    shutil.copytree(art.path, tmp_path / "artifact")
    shutil.copy(art.ckpt, tmp_path / "m.pth")
    shutil.copy(art.ann, tmp_path / "ann.json")
    shutil.copytree(art.img_dir, tmp_path / "images")
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    return tmp_path


def no_temporaries(folder: Path) -> list[str]:
    """Hidden entries the tool may leave by mistake (staged folders, half-written files)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ triton-repo: what --force may replace

def _has_tritonclient() -> bool:
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return False
    return True


needs_tritonclient = pytest.mark.skipif(not _has_tritonclient(), reason="needs the [serve] extra (tritonclient[grpc])")


def triton(*args) -> list:
    return ["triton-repo", *args]


@needs_tritonclient
def test_triton_repo_force_replaces_only_its_own_unchanged_repository(work, capsys):
    out = work / "repo"
    first = call_main(cli.main, triton(work / "artifact", out), capsys)
    assert first.rc == 0, first.err
    record = json.loads((out / "repq-triton.json").read_text())
    assert record["format"] == "repq-export-triton-repository"
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(record["files"]) == written - {"repq-triton.json"}
    again = call_main(cli.main, triton(work / "artifact", out, "--force"), capsys)
    assert again.rc == 0, again.err
    assert (out / "repq_network/1/model.onnx").read_bytes() == (work / "artifact/model.onnx").read_bytes()
    assert no_temporaries(work) == [] and (work / "notes.txt").read_text() == "the user's own file\n"

    (out / "my_model" / "1").mkdir(parents=True)  # the user adds a model of theirs to the repository
    (out / "my_model" / "config.pbtxt").write_text('name: "my_model"\n')
    before = tree(work)
    one_error(call_main(cli.main, triton(work / "artifact", out, "--force"), capsys), "OUT", "my_model",
              "did not write", "left alone")
    assert tree(work) == before
    shutil.rmtree(out / "my_model")

    (out / "repq_preprocess/1/model.py").write_text("# the user's edit\n")  # an edited file of ours
    before = tree(work)
    one_error(call_main(cli.main, triton(work / "artifact", out, "--force"), capsys), "repq_preprocess/1/model.py",
              "changed since", "left alone")
    assert tree(work) == before


@needs_tritonclient
def test_triton_repo_into_an_empty_folder_made_for_it(work, capsys):
    (work / "repo").mkdir()
    result = call_main(cli.main, triton(work / "artifact", work / "repo"), capsys)
    assert result.rc == 0, result.err
    assert (work / "repo" / "repq-triton.json").is_file() and no_temporaries(work) == []


@needs_tritonclient
def test_triton_repo_force_keeps_another_model_repository(work, capsys):
    other = work / "models"
    (other / "resnet" / "1").mkdir(parents=True)
    (other / "resnet" / "config.pbtxt").write_text('name: "resnet"\nbackend: "onnxruntime"\n')
    (other / "resnet" / "1" / "model.onnx").write_bytes(b"someone else's network")
    before = tree(work)
    one_error(call_main(cli.main, triton(work / "artifact", other, "--force"), capsys), "OUT", "models",
              "not a Triton model repository written by repq-export", "left alone")
    assert tree(work) == before


@needs_tritonclient
def test_triton_repo_force_trusts_no_forged_manifest(work, capsys):
    """A repq-triton.json with the format marker is not enough: recorded names must be the tool's, bytes must match."""
    folder = work / "forged"
    (folder / "repq_network" / "1").mkdir(parents=True)
    (folder / "repq_network" / "1" / "model.onnx").write_bytes(b"the user's graph")
    manifest = {"format": "repq-export-triton-repository", "files": {"repq_network/1/model.onnx": "0" * 64}}
    (folder / "repq-triton.json").write_text(json.dumps(manifest))
    before = tree(work)
    one_error(call_main(cli.main, triton(work / "artifact", folder, "--force"), capsys), "changed since")
    assert tree(work) == before
    manifest["files"] = {"../notes.txt": "0" * 64}
    (folder / "repq-triton.json").write_text(json.dumps(manifest))
    before = tree(work)
    one_error(call_main(cli.main, triton(work / "artifact", folder, "--force"), capsys), "../notes.txt",
              "not a file name repq-export writes")
    assert tree(work) == before


@needs_tritonclient
@pytest.mark.parametrize("where", [".", "cwd", "artifact", "parent of the artifact", "inside the artifact",
                                   "symlink to a folder"])
def test_triton_repo_never_writes_over_the_current_folder_or_the_artifact(work, where, capsys, monkeypatch):
    (work / "elsewhere").mkdir()
    (work / "elsewhere" / "keep.txt").write_text("keep\n")
    (work / "link").symlink_to(work / "elsewhere")
    monkeypatch.chdir(work)
    out = {".": Path("."), "cwd": work, "artifact": work / "artifact", "parent of the artifact": work,
           "inside the artifact": work / "artifact" / "repo", "symlink to a folder": work / "link"}[where]
    before = tree(work)
    for force in ((), ("--force",)):
        one_error(call_main(cli.main, triton(work / "artifact", out, *force), capsys), "OUT")
        assert tree(work) == before


def fsize_limit(limit: int):
    """preexec_fn: files this process writes may not grow past `limit` bytes (write() then fails with
    EFBIG, as on a disk that fills up), without root and without touching any real disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def run_limited(limit: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m repq_export.cli args` whose writes fail past `limit` bytes a file."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=fsize_limit(limit))


@needs_tritonclient
def test_triton_repo_on_a_full_disk_leaves_nothing_and_keeps_the_old_repository(work, capsys):
    size = (work / "artifact" / "model.onnx").stat().st_size
    assert size > 200_000  # the network copy is the write that fails; configs are a few kB
    result = run_limited(100_000, *triton(work / "artifact", work / "repo"), cwd=work)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: OUT"), result.stderr[-2000:]
    assert "cannot write it" in lines[0] and "Traceback" not in result.stderr
    assert not (work / "repo").exists() and no_temporaries(work) == []

    assert call_main(cli.main, triton(work / "artifact", work / "repo"), capsys).rc == 0
    before = tree(work)
    result = run_limited(100_000, *triton(work / "artifact", work / "repo", "--force"), cwd=work)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert tree(work) == before  # the old repository, whole, and nothing beside it


@needs_tritonclient
def test_triton_repo_disk_full_names_the_disk(work, capsys, monkeypatch):
    from repq_export.serving import triton_repo

    def disk_full(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(triton_repo, "copy_file", disk_full)
    line = one_error(call_main(cli.main, triton(work / "artifact", work / "repo"), capsys), "OUT", "repo",
                     f"the disk mounted at {files.mount_point(work)} is full")
    assert "MiB free" in line
    assert not (work / "repo").exists() and no_temporaries(work) == []


# ------------------------------------------------------------------ artifacts: --force checks the recorded sha256s


def export(work: Path, out: Path, *extra) -> list:
    return ["--ckpt", work / "m.pth", "--config", TINY_MASK, "--bits", 4, "--calib", work / "images", "--out", out,
            "--quiet", "--calib-images", 1, "--accept-accuracy-loss", *extra]  # a random model: no accuracy to check


def test_force_keeps_an_artifact_whose_recorded_file_changed(work, capsys):
    with open(work / "artifact" / "quant.pth", "ab") as f:
        f.write(b"\0")  # e.g. a hand-edited or re-saved state
    before = tree(work)
    result = call_main(cli.main, export(work, work / "artifact", "--force"), capsys)
    one_error(result, "--out", "quant.pth", "changed since", "left alone")
    assert "calibrating" not in result.out and tree(work) == before


def test_force_keeps_files_a_forged_repq_json_names(work, capsys):
    """A repq.json carrying the format marker does not make a folder ours: names and bytes are checked."""
    folder = work / "forged"
    folder.mkdir()
    (folder / "thesis.onnx").write_bytes(b"years of work")
    (folder / "repq.json").write_text(json.dumps({"format": "repq-export-artifact",
                                                   "onnx": {"file": "thesis.onnx", "sha256": "0" * 64}}))
    before = tree(work)
    one_error(call_main(cli.main, export(work, folder, "--force"), capsys), "thesis.onnx", "changed since")
    assert tree(work) == before
    (folder / "repq.json").write_text(json.dumps({"format": "repq-export-artifact",
                                                   "added_files": {"../notes.txt": "0" * 64}}))
    before = tree(work)
    one_error(call_main(cli.main, export(work, folder, "--force"), capsys), "not a file name repq-export writes")
    assert tree(work) == before


def test_force_keeps_an_unrecorded_engine_and_deletes_a_recorded_one(work, capsys):
    (work / "artifact" / "model.engine").write_bytes(b"an engine built by hand")
    before = tree(work)
    one_error(call_main(cli.main, export(work, work / "artifact", "--force"), capsys), "model.engine", "did not write")
    assert tree(work) == before
    record_added_file(work / "artifact", work / "artifact" / "model.engine")  # what `--engine` does
    assert call_main(cli.main, export(work, work / "artifact", "--force"), capsys).rc == 0
    assert sorted(p.name for p in (work / "artifact").iterdir()) == ["model.onnx", "quant.pth", "repq.json"]
    assert no_temporaries(work) == []


def test_default_out_under_a_file_named_repq_out(work, capsys, monkeypatch):
    (work / "repq-out").write_text("a file of the user's\n")
    monkeypatch.chdir(work)
    before = tree(work)
    argv = ["--ckpt", work / "m.pth", "--config", TINY_MASK, "--bits", 4, "--calib", work / "images", "--quiet"]
    line = one_error(call_main(cli.main, argv, capsys), "repq-out", "is a file, not a folder")
    assert "does not exist" not in line and tree(work) == before


@pytest.mark.parametrize("disk", ["full", "not full"])
def test_quant_pth_write_failure_is_one_line(work, disk, capsys, monkeypatch):
    """torch.save fails with its own 'enforce fail' RuntimeError when a write fails; the user sees the file,
    and the disk where it is full. The write really fails (a file size limit, no root needed); a full disk's
    free space is what `free_bytes` reports."""
    if disk == "full":
        monkeypatch.setattr(files, "free_bytes", lambda folder: 0)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
    try:
        result = call_main(cli.main, export(work, work / "out"), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    reason = "cannot write it: the disk mounted at" if disk == "full" else "cannot write it (the write failed)"
    line = one_error(result, f"{work / 'out' / 'quant.pth'}: {reason}")
    assert "enforce" not in line and ".tmp" not in line
    assert not (work / "out").exists() and no_temporaries(work) == []


# ------------------------------------------------------------------ no command writes onto its own inputs


def link(kind: str, target: Path, name: Path) -> Path:
    """`name` as a symbolic or hard link to `target` (or `target` itself)."""
    if kind == "symlink":
        name.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, name)
    else:
        return target
    return name


@pytest.mark.parametrize("kind", ["same path", "symlink", "hardlink"])
@pytest.mark.parametrize("option, victim", [("--json-out", "m.pth"), ("--out", "ann.json"), ("--save-quant", "m.pth"),
                                            ("--json-out", "ann.json")])
def test_tools_test_never_writes_over_its_inputs(work, kind, option, victim, capsys):
    out = link(kind, work / victim, work / f"link-{victim}")
    before = tree(work)
    argv = [TINY_MASK, work / "m.pth", "--ann", work / "ann.json", "--img-dir", work / "images", "--quiet",
            "--w_bits", 4, "--a_bits", 4, option, out]
    one_error(call_main(test_tool.main, argv, capsys), option, "an input of this command")
    assert tree(work) == before


def test_tools_test_outputs_inside_an_input_folder_or_named_twice(work, capsys):
    base = [TINY_MASK, work / "m.pth", "--ann", work / "ann.json", "--img-dir", work / "images", "--quiet"]
    before = tree(work)
    one_error(call_main(test_tool.main, base + ["--out", work / "images" / "000000000001.png"], capsys), "--out",
              "inside --img-dir")
    one_error(call_main(test_tool.main, base + ["--out", work / "r.json", "--json-out", work / "r.json"], capsys),
              "--json-out", "is also --out")
    one_error(call_main(test_tool.main, base + ["--backend", "ort", "--model", work / "artifact", "--json-out",
                                                 work / "artifact" / "repq.json"], capsys), "inside --model")
    assert tree(work) == before


def test_tools_test_runs_as_subprocess_and_keeps_the_checkpoint(work):
    """The case of the issue, as a user types it: exit 2, the checkpoint's bytes unchanged."""
    before = (work / "m.pth").read_bytes()
    result = run_cli(TEST_PY, TINY_MASK, work / "m.pth", "--ann", work / "ann.json", "--img-dir", work / "images",
                     "--quiet", "--json-out", work / "m.pth")
    one_error(result, "--json-out", "CHECKPOINT")
    assert (work / "m.pth").read_bytes() == before


@pytest.mark.parametrize("option, target", [("--json-out", "ann.json"), ("--json-out", "artifact/repq.json"),
                                            ("--save-plot", "images/000000000001.png"), ("--save-images", "images")])
def test_parity_check_never_writes_over_its_inputs(work, option, target, capsys):
    before = tree(work)
    argv = [work / "artifact", "--ann", work / "ann.json", "--img-dir", work / "images", "--quiet", option,
            work / target]
    one_error(call_main(parity_tool.main, argv, capsys), option)
    assert tree(work) == before


def test_parity_check_json_out_hard_link_to_the_annotation_file(work):
    out = link("hardlink", work / "ann.json", work / "report.json")
    before = tree(work)
    one_error(run_cli(PARITY_PY, work / "artifact", "--ann", work / "ann.json", "--img-dir", work / "images",
                      "--json-out", out), "--json-out", "--ann")
    assert tree(work) == before


@pytest.mark.parametrize("kind", ["same path", "symlink", "hardlink"])
def test_predict_never_writes_over_its_image(work, kind, capsys):
    image = work / "images" / "000000000001.png"
    out = link(kind, image, work / "picture.png")
    before = tree(work)
    one_error(call_main(cli.main, ["predict", work / "artifact", image, "--save", out], capsys), "--save", "IMAGE")
    assert tree(work) == before


@needs_tritonclient
def test_infer_never_writes_over_its_image(work, capsys):
    image = work / "images" / "000000000001.png"
    out = link("hardlink", image, work / "picture.png")
    before = tree(work)
    one_error(call_main(cli.main, ["infer", "http://127.0.0.1:9", image, "--save", out], capsys), "--save", "IMAGE")
    assert tree(work) == before


def test_predict_never_writes_into_the_artifact(work, capsys):
    before = tree(work)
    one_error(call_main(cli.main, ["predict", work / "artifact", work / "images" / "000000000001.png", "--save",
                                   work / "artifact" / "p.png"], capsys), "--save", "inside ARTIFACT")
    assert tree(work) == before


def test_demo_json_out_never_writes_over_the_checkpoint(work, capsys):
    before = tree(work)
    one_error(call_main(cli.main, ["demo", "--ckpt", work / "m.pth", "--config", TINY_MASK, "--work-dir",
                                   work / "d", "--json-out", work / "m.pth"], capsys), "--json-out", "--ckpt")
    assert tree(work) == before


@pytest.mark.parametrize("where", ["calib folder", "inside the calib folder", "parent of the checkpoint",
                                   "symlink to an artifact"])
def test_export_never_writes_over_its_inputs(work, where, capsys):
    (work / "link").symlink_to(work / "artifact")
    out = {"calib folder": work / "images", "inside the calib folder": work / "images" / "art",
           "parent of the checkpoint": work, "symlink to an artifact": work / "link"}[where]
    before = tree(work)
    result = call_main(cli.main, export(work, out, "--force"), capsys)
    one_error(result, "--out")
    assert "calibrating" not in result.out and tree(work) == before


# ------------------------------------------------------------------ demo: the synthetic set, --num-images


def test_demo_refuses_a_users_folder_where_it_would_write_an_artifact(work, capsys):
    """Checked before the synthetic set is made: the demo replaces only artifact folders it wrote."""
    folder = work / "d" / "m-w4a4"
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("mine\n")
    before = tree(work)
    result = call_main(cli.main, ["demo", "--ckpt", work / "m.pth", "--config", TINY_MASK, "--bits", 4,
                                  "--work-dir", work / "d"], capsys)
    one_error(result, "--work-dir", "m-w4a4", "left alone")
    assert "generating" not in result.out and tree(work) == before


def test_demo_num_images_is_bounded(tmp_path, capsys):
    one_error(call_main(cli.main, ["demo", "--work-dir", tmp_path / "d", "--num-images", 10 ** 9], capsys),
              "--num-images", "5000")
    assert not (tmp_path / "d").exists()


def test_ctrl_c_during_generation_leaves_no_partial_set(tmp_path):
    work = tmp_path / "d"
    # SIGINT back to its default in the child: a run started in the background (nohup ... &) inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, *CLI, "demo", "--work-dir", str(work), "--num-images", "3000"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    staged = []
    while proc.poll() is None and time.monotonic() < deadline:  # a few images written into the staged folder
        staged = list(work.glob(".synthetic-val-3000-seed2026.tmp*/val/*.png")) if work.is_dir() else []
        if len(staged) >= 3:
            break
        time.sleep(0.05)
    assert staged, "the generation was not seen in its staged folder"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in work.iterdir()) == []  # nothing half made, no staged folder


def test_an_incomplete_synthetic_set_is_remade(tmp_path):
    from repq_export.commands.demo import synthetic_set
    from repq_export.data.synthetic import synthetic_set_complete

    ann, img_dir = synthetic_set(tmp_path, 3)
    whole = tree(tmp_path)
    assert synthetic_set_complete(ann.parents[1], "val", 3) and no_temporaries(tmp_path) == []
    (img_dir / "000000000002.png").unlink()  # as an interrupted older version left it
    ann.unlink()
    synthetic_set(tmp_path, 3)
    assert tree(tmp_path) == whole  # the same bytes again


def test_train_synthetic_never_writes_over_its_init_checkpoint(work):
    before = tree(work)
    result = run_cli((str(REPO / "tools/train_synthetic.py"),), "--config",
                     REPO / "configs/synthetic/mask_rcnn_swin_synthetic.py", "--out", work / "m.pth",
                     "--init-from", work / "m.pth", "--train-dir", work / "train")
    one_error(result, "--out", "--init-from")
    assert tree(work) == before


def test_a_killed_generation_is_cleaned_by_the_next_run(tmp_path):
    """SIGKILL leaves the staged folder; the next run removes it once its process is gone, unless it holds a
    file the tool never writes there."""
    from repq_export.commands.demo import synthetic_set

    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".synthetic-val-3-seed2026.tmp{proc.pid}"
    (stale / "val").mkdir(parents=True)
    (stale / "val" / "000000000001.png").write_bytes(b"half")
    (stale / "val" / ".000000000002.png.tmp77").write_bytes(b"half")
    users = tmp_path / f".synthetic-val-3-seed2026.tmp{proc.pid + 100000}"
    (users / "val").mkdir(parents=True)
    (users / "val" / "holiday.jpg").write_bytes(b"mine")
    synthetic_set(tmp_path, 3)
    assert not stale.exists() and (users / "val" / "holiday.jpg").read_bytes() == b"mine"


def test_make_synthetic_coco_never_overwrites_a_users_files(tmp_path):
    """`tools/make_synthetic_coco.py --out DIR` into a folder holding a user's COCO copy: refused, bytes kept;
    rerunning into its own set gives the same files."""
    tool = (str(REPO / "tools/make_synthetic_coco.py"),)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_val.json").write_text('{"images": [], "info": {"description": "COCO"}}')
    before = tree(tmp_path)
    one_error(run_cli(tool, "--out", data, "--num-images", 2), "instances_val.json", "left alone")
    assert tree(tmp_path) == before

    mine = tmp_path / "mine"
    (mine / "val").mkdir(parents=True)
    (mine / "val" / "000000000001.png").write_bytes(b"a photo of the user's")
    before = tree(tmp_path)
    one_error(run_cli(tool, "--out", mine, "--num-images", 2), "000000000001.png", "left alone")
    assert tree(tmp_path) == before

    assert run_cli(tool, "--out", tmp_path / "set", "--num-images", 2).rc == 0
    made = tree(tmp_path / "set")
    assert run_cli(tool, "--out", tmp_path / "set", "--num-images", 2).rc == 0
    assert tree(tmp_path / "set") == made
