"""Resource limits and ``/proc`` readings: CPU time and RSS of a process, the machine's busy time."""

from __future__ import annotations

import os
import resource

__all__ = ["cpu_seconds", "machine_busy_seconds", "raise_nofile", "rss_bytes"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit toward ``wanted``; return the new soft limit.

    The hard limit is raised too when the process may (root); otherwise the soft
    limit stops at the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    # The command name (field 2) may hold spaces; the fields after ')' do not.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs, from ``/proc/stat``."""
    with open("/proc/stat", "rb") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
