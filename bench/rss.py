"""Run `python -m app ARGS` in this process and write its peak RSS to a file on the way out.

    python bench/rss.py OUT.json dump

The job's own peak (Python) is `self`: `VmHWM`, the peak of this process's own memory
since it started (getrusage's ru_maxrss would start from the size of the process that
forked it). The benchmark samples pg_dump's peak itself. The job is imported from the
working directory, so an older revision unpacked there runs instead of the installed one.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["app", *sys.argv[2:]]
    sys.path.insert(0, os.getcwd())
    try:
        runpy.run_module("app", run_name="__main__", alter_sys=True)
    finally:
        peak = {"self": peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(peak, handle)


def peak_rss(pid: int | str = "self") -> int:
    """A process's peak resident memory (`VmHWM`), in bytes; 0 where /proc has none."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
