"""Whether this CPU runs a graph exported for target CPU 'vnni' exactly.

onnxruntime's u8s8 kernels on x86 CPUs with AVX2 but without VNNI add pairs of uint8 x int8
products in int16 (vpmaddubsw), which saturates for full-range int8 weights; with AVX-512 VNNI,
AVX-VNNI or AMX (and on ARM64, whose dot-product kernels widen to int32) nothing saturates.
Read from /proc/cpuinfo: where that cannot be read on x86 the answer is "not known", and a
'vnni' graph is refused rather than run at the risk of wrong results.
"""

from __future__ import annotations

import platform
from pathlib import Path

from ..deploy_config import TARGET_CPUS, TARGET_VNNI
from ..errors import UserError

#: /proc/cpuinfo flags of x86 CPUs whose u8s8 kernels accumulate in int32 (no int16 pair sums)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ARM64 = ("aarch64", "arm64")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first processor's flags, or None where /proc/cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


def saturation_free(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """True where onnxruntime's u8s8 kernels cannot saturate on this CPU (known VNNI/AMX x86, ARM64)."""
    machine = (machine or platform.machine()).lower()
    if machine in ARM64:
        return True
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and any(f in flags for f in VNNI_FLAGS)


def require_cpu_for(target_cpu: str, where: str, machine: str | None = None,
                    flags: set[str] | None = None) -> None:
    """Refuse, in one line, to run a graph exported for `target_cpu` on a CPU it is not exact on
    (or for a target this version does not know)."""
    if target_cpu not in TARGET_CPUS:
        raise UserError(f"{where}: exported for an unknown target CPU {target_cpu!r} (this repq-export knows "
                        f"{', '.join(TARGET_CPUS)}); re-export it with this version")
    if target_cpu == TARGET_VNNI and not saturation_free(machine, flags):
        raise UserError(f"{where}: exported for target CPU 'vnni' (full-range int8 weights), but this CPU "
                        f"has none of {', '.join(VNNI_FLAGS)}: its u8s8 kernels could saturate and change "
                        "results; export with target_cpu='any' (instance-seg_onnxruntime_cpu.py)")
