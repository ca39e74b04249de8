"""What this machine has to offer a model: its available memory."""

from __future__ import annotations

import os


def available_ram() -> int:
    """Bytes of system memory available to a new process now (0 where the system does not say)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # the [local] extra brings psutil; Linux says it without
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return 0
