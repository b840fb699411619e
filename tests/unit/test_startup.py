"""The start-up phases' line and the process age they are measured from."""

from __future__ import annotations

import subprocess
import sys
import time

from sdqueue_worker.startup import describe, process_age_s


def test_the_line_lists_the_phases_in_order_and_leads_with_ready() -> None:
    phases = {"process_s": 19.26, "load_s": 1.3, "warmup_batch_8_s": 9.29, "ready_s": 44.28}
    assert (
        describe(phases)
        == "ready 44.3s after the process started: process 19.3, load 1.3, warmup_batch_8 9.3"
    )
    assert describe({"load_s": 0.5}) == "ready: load 0.5"


def test_process_age_counts_from_the_process_start() -> None:
    began = time.monotonic()
    code = "import time; time.sleep(0.5); from sdqueue_worker.startup import process_age_s; print(process_age_s())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    age, wall = float(out), time.monotonic() - began
    assert 0.5 <= age <= wall + 0.05, (age, wall)
    mine = process_age_s()
    assert mine is not None and mine > 0
