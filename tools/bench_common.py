"""Shared helpers of the benchmark scripts (tools/bench_*.py): machine description, the benchmark
image and model, memory readings, timing, Markdown tables, and running one variant per process.

Memory is the resident set size read from /proc/self/status: ``VmRSS`` now and ``VmHWM`` (its
high-water mark). Writing ``5`` to /proc/self/clear_refs resets the high-water mark, so a phase's
peak can be measured on its own; where that is not allowed the process-lifetime peak
(``getrusage().ru_maxrss``) is reported instead and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_RESULT "
DEFAULT_SIZE = "800x1199"  # the reference's calibration image (COCO 000000397133), padded to 800x1216


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")) -> str:
    """Which of the SIMD features that matter for int8 kernels the CPU reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in wanted if f in have) or "none of " + ",".join(wanted)
    except OSError:
        pass
    return "unknown"


def mem_total_gib() -> float:
    """Physical memory of the machine in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def machine_lines(threads: int) -> list[str]:
    """Markdown bullet lines describing the machine, the libraries and the thread setting."""
    import numpy
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    load = os.getloadavg()
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores "
        f"({len(os.sched_getaffinity(0))} usable), SIMD: {cpu_flags()}",
        f"- memory: {mem_total_gib():.1f} GiB; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(the machine is shared with other jobs: absolute times are noisy, ratios within one run less so)",
        f"- python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort_version}, "
        f"numpy {numpy.__version__}; compute threads: {threads}",
    ]


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """RSS high-water mark in MiB since the last reset (VmHWM), else the process-lifetime ru_maxrss."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


# ----------------------------------------------------------------------------- inputs and models


def bench_parser(doc: str, threads_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script has: the module docstring as help, ``--size``,
    ``--threads`` (default 2) and ``--seed``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(doc.splitlines()[1:]))
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                        help="resized image HxW before padding to 32 (default %(default)s: 800x1199, padded to "
                             "800x1216, as the reference's first COCO val image)")
    parser.add_argument("--threads", type=int, default=2, help=threads_help + " (default 2, this machine's cores; "
                        "use 1 when other jobs keep the cores busy: oversubscribed threads wait on each other)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed (default 0)")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (h, w) of the resized image before padding."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected HxW such as 800x1199, got {text!r}") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"--size: {text} is too small (each side >= 64)")
    return h, w


def bench_image(size: tuple[int, int], index: int = 0):
    """A synthetic COCO-style image resized to exactly ``size`` (h, w), preprocessed (normalized,
    padded to 32) as every runner receives it: returns ``(img [1,3,Hp,Wp], img_hw [2])``."""
    import cv2
    import torch

    from repq_export.data.synthetic import synthesize_image
    from repq_export.data.transforms import preprocess

    h, w = size
    bgr, _ = synthesize_image(seed=0, split="bench", index=index)
    bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    prep = preprocess(bgr, scale=(max(h, w), min(h, w)))  # scale factor 1: already at size
    assert prep.img_hw == (h, w), prep.img_hw
    return prep.tensor, torch.tensor(prep.img_hw, dtype=torch.float32)


def random_detector(arch: str, seed: int = 0, confident_classes: int = 3, boost: float = 6.0):
    """Full-size detector of a reference architecture with random weights, in eval mode.

    The box heads' logits of the first ``confident_classes`` classes are raised by ``boost`` so
    that random weights still give detections (up to 100): the mask head then runs as on a real
    image, and calibration sees data in every quantizer.
    """
    import torch

    from repq_export.models.arch import ARCHS
    from repq_export.models.build import build_detector
    from repq_export.models.mmdet_config import config_from_arch
    from repq_export.models.random_checkpoint import init_random_weights

    model = build_detector(config_from_arch(ARCHS[arch]))
    init_random_weights(model, seed)
    heads = model.roi_head.bbox_head
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]
    with torch.no_grad():
        for head in heads:
            head.fc_cls.bias[:confident_classes] += boost
    return model.eval()


def param_count_m(model) -> float:
    """Number of parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


# ----------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of timings."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def fmt_times(s: dict[str, float], unit: float = 1.0, digits: int = 2) -> str:
    """'median (min-max)' of a summary, scaled by ``unit``."""
    return f"{s['median'] * unit:.{digits}f} ({s['min'] * unit:.{digits}f}-{s['max'] * unit:.{digits}f})"


# ----------------------------------------------------------------------------- Markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that started this run, as typed (relative to the repository root)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


# ----------------------------------------------------------------------------- one variant a process


def run_worker(task: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run this script again as ``--worker JSON`` in a fresh process and return its result dict.

    A fresh process per variant keeps one variant's memory (model, allocator caches) out of the
    next one's peak; stderr (progress, warnings) passes through.
    """
    cmd = [sys.executable, sys.argv[0], "--worker", json.dumps(task)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    results = [ln[len(RESULT_TAG):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not results:
        return {"error": f"worker exited with {proc.returncode}", "task": task}
    return json.loads(results[-1])


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result for ``run_worker`` to pick up."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and one inter-op thread)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
