#!/usr/bin/env python3
"""Baseline of the discovery benchmark: find job files the way a script around
pyats-image-builder would, by extracting the image's workspace and scanning it.

    builder_scan.py CONTAINER ROOT

Streams `docker cp CONTAINER:ROOT -` into `tar -x` in a temporary directory, walks the whole tree,
reads the first 10 lines of every `.py` (the PYATS_JOBFILE marker) and, for files that match the
default job regex or carry the marker, the whole file for a top-level `def main(`. Prints JSON:
{"seconds": extract + scan, "jobs": [...], "files_read": N}. Removing the extracted tree is not
timed (that favours the baseline).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MATCH = re.compile(r".*job.*\.py$")
MAIN = re.compile(rb"^def main\(", re.M)


def main():
    container, root = sys.argv[1], sys.argv[2]
    dest = tempfile.mkdtemp(prefix="builder-scan-")
    try:
        started = time.perf_counter()
        cp = subprocess.Popen(["docker", "cp", f"{container}:{root}", "-"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", dest], stdin=cp.stdout, check=True)
        cp.stdout.close()
        if cp.wait():
            sys.exit("docker cp failed")
        base = os.path.join(dest, os.path.basename(root.rstrip("/")))
        jobs, files_read = [], 0
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                files_read += 1
                with open(path, "rb") as f:
                    head = b"".join(f.readline() for _ in range(10))
                    inside = root.rstrip("/") + path[len(base):]
                    if MATCH.match(inside) or b"PYATS_JOBFILE" in head:
                        if MAIN.search(head + f.read()):
                            jobs.append(inside)
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "jobs": sorted(jobs), "files_read": files_read}))
    finally:
        shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
