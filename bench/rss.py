"""Run `python -m app ARGS` in this process and write its peak RSS to a file on the way out.

    python bench/rss.py OUT.json dump

The job's own peak (Python) is `self`; `children` is the largest child it waited for
(pg_dump). The job is imported from the working directory, so an older revision unpacked
there runs instead of the installed one.
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
        peak = {
            "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        }
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(peak, handle)


if __name__ == "__main__":
    main()
