"""Memory probes shared by the benchmarks: this process's RSS and peak RSS (Linux ``/proc``)."""

from __future__ import annotations


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (from /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, own process, no root needed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
