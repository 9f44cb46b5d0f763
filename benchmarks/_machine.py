"""What the benchmark scripts record about the machine they ran on."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else what :mod:`platform` says.

    (``platform.processor()`` is often empty on Linux, hence ``/proc/cpuinfo`` first.)
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
