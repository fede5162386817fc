"""The job's progress line (jobs.generate.Progress): lines while nothing arrives, a rate that leaves start-up out."""

import time

import jobs.generate
from jobs.generate import Progress


def lines_of(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(jobs.generate, "log", lines.append)
    return lines


def test_the_rate_and_eta_leave_start_up_out_and_a_stall_shows(monkeypatch):
    lines = lines_of(monkeypatch)
    now = [0.0]
    progress = Progress(100, 5, clock=lambda: now[0])
    now[0] = 6
    progress.tick()  # the models still loading
    assert lines[-1].endswith("0.00 images/s, ETA ?, 0 errors; waiting for the first images (6s)")
    now[0] = 30
    progress.update(4, 0)  # the first images, 30 s in: no rate yet (it would count the 30 s of start-up)
    assert lines[-1] == "4/100 images (4.0%), 0.00 images/s, ETA ?, 0 errors"
    now[0] = 38
    progress.update(4, 1)  # 4 images in 8 s: 0.5 images/s, 92 left: 3m04s (not 8 images in 38 s: 7m17s)
    assert lines[-1] == "8/100 images (8.0%), 0.50 images/s, ETA 3m04s, 1 errors"
    now[0] = 40
    progress.tick()  # a line 2 s after the last: too soon
    assert len(lines) == 3
    now[0] = 78
    progress.tick()  # 40 s without images: the rate falls as the stall lasts, and the line says so
    assert lines[-1] == "8/100 images (8.0%), 0.08 images/s, ETA 18m24s, 1 errors; none for 40s"
    now[0] = 80
    progress.update(92, 0)  # all done: the last line's rate is the whole run's, start-up included (100 in 80 s)
    assert lines[-1] == "100/100 images (100.0%), 1.25 images/s, ETA 0m00s, 1 errors"


def test_batches_written_together_make_no_rate_and_a_run_done_at_once_ends_with_its_own(monkeypatch):
    """Two batches written 30 ms apart read as 67 images/s where the run made 0.2; and a run whose images came in one
    update ended on "0.00 images/s, ETA ?" (a review, 2026-11-30)."""
    lines = lines_of(monkeypatch)
    now = [20.0]
    progress = Progress(10, 0.01, clock=lambda: now[0])
    progress.update(4, 0)
    now[0] += 0.03
    progress.update(2, 0)
    assert lines[-1] == "6/10 images (60.0%), 0.00 images/s, ETA ?, 0 errors"
    now[0] = 40.0
    progress.update(4, 0)
    assert lines[-1] == "10/10 images (100.0%), 0.50 images/s, ETA 0m00s, 0 errors"
    now[0] = 0.0
    at_once = Progress(4, 5, clock=lambda: now[0])
    now[0] = 19.0
    at_once.update(4, 4)
    assert lines[-1] == "4/4 images (100.0%), 0.21 images/s, ETA 0m00s, 4 errors"


def test_the_ticker_prints_while_no_images_arrive_and_stops(monkeypatch):
    lines = lines_of(monkeypatch)
    progress = Progress(10, 0.05)
    progress.start()
    time.sleep(0.5)
    progress.stop()
    printed = len(lines)
    assert printed >= 2 and all("waiting for the first images" in line for line in lines)
    time.sleep(0.2)
    assert len(lines) == printed  # stopped
