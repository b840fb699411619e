"""Peak memory and time of ``sdqueue bulk FILE --dry-run`` as the file grows (is it flat?).

    .venv/bin/python -m benchmarks.bulk_dry_run_rss [--lines 10000 100000 1000000] [--out FILE.json]

For each size, writes a JSONL file of txt2img jobs (every 100th line repeats an earlier one, every
1000th is invalid), runs the real CLI on it in a child process with stdout to /dev/null, and
reads the child's peak resident set size (``ru_maxrss``) and wall time. No Redis or S3 is needed:
a dry run validates, hashes and checks duplicates only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def write_file(path: Path, lines: int) -> None:
    with path.open("w") as out:
        for i in range(1, lines + 1):
            if i % 1000 == 0:
                out.write(json.dumps({"mode": "txt2img", "prompt": "bad", "steps": 0}) + "\n")
                continue
            n = i - 50 if i % 100 == 0 else i
            job = {
                "mode": "txt2img",
                "prompt": f"a lighthouse at dusk, variation {n}",
                "seed": n,
                "steps": 25,
            }
            out.write(json.dumps(job) + "\n")


def measure(path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("producer", "worker", "."))}
    argv = [sys.executable, "-m", "sdqueue.cli", "bulk", str(path), "--dry-run"]
    began = time.perf_counter()
    with open(os.devnull, "w") as sink:
        child = subprocess.Popen(argv, stdout=sink, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
        assert child.stderr is not None
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "last_stderr_line": stderr.strip().splitlines()[-1] if stderr.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="sdq-rss-") as folder:
        for lines in args.lines:
            path = Path(folder) / f"jobs-{lines}.jsonl"
            write_file(path, lines)
            figures = {"lines": lines, "file_mib": round(path.stat().st_size / 2**20, 1), **measure(path)}
            path.unlink()
            print(json.dumps(figures))
            runs.append(figures)
    result = {
        "command": "sdqueue bulk FILE --dry-run > /dev/null",
        "runs": runs,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "note": "2-core VM shared with other jobs: wall time depends on the load, peak RSS does not",
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
