"""Train the family's stages side by side: each stage in its own process as soon as the stages it reads are done.

On a CPU a small model's step does not get twice as fast on twice the threads (its matrices are too small to keep
two cores busy), so two stages on one thread each finish well before the same two one after another on two threads:
on an AVX2 machine with 2 cores the whole recipe took 88 minutes this way (43 on an AVX-512 one), against 1.5 to 2
hours there with the stages more in turn (docs/TRAINING.md). The dependency graph allows it twice: Stage A beside
the semantic encoder, Stage B beside Stage C.

Each stage runs as `python -m cascade.train <stage> --recipe ... --no-progress`, the same command a user runs for one
stage, so it checkpoints, resumes and records itself in family.json exactly as that command does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

LOCK_FD_ENV = "CASCADE_TRAIN_LOCK_FD"  # the folder lock's descriptor, inherited by a stage's process (demo.folder_lock)

# Which ready stage starts first when there are more than free slots: the critical path (semantic encoder -> text
# encoder -> Stage C, the longest stage) before the rest.
PRIORITY = ("semantic", "text_encoder", "stage_c", "stage_a", "stage_b")


class StageFailed(RuntimeError):
    """A stage's process exited with an error (its own output says why), or a stage's inputs will not come."""


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def train_side_by_side(
    out: Path, recipe, stages, needs, output_of, jobs: int, log=print, lock_fd: int | None = None
) -> dict:
    """Train `stages` (not yet trained), at most `jobs` at once, each on cpu_count // jobs threads, as `needs[stage]`
    have their outputs (`output_of(out, stage)`); returns {stage: summary}. A stage that fails stops the rest (they
    resume from their checkpoints when the command is run again) and raises StageFailed naming it. `lock_fd`: the
    folder's training lock (demo.folder_lock), which each stage's process inherits."""
    todo = sorted(stages, key=PRIORITY.index)
    recipe_file = out / "checkpoints" / "recipe.json"  # what every stage's process reads
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    threads = threads_per_job(jobs)
    package_root = str(Path(__file__).resolve().parents[2])  # `-m cascade.train` finds this copy from any folder
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path}
    inherited = ()
    if lock_fd is not None:  # the stage processes hold the folder's lock too (demo.folder_lock)
        inherited, env[LOCK_FD_ENV] = (lock_fd,), str(lock_fd)
    running: dict[str, subprocess.Popen] = {}
    done: dict[str, dict] = {}
    try:
        while todo or running:
            for stage in [s for s in todo if all(output_of(out, n).is_file() for n in needs[s])]:
                if len(running) == jobs:
                    break
                command = [sys.executable, "-m", "cascade.train", stage.replace("_", "-"), "--out", str(out)]
                command += ["--recipe", str(recipe_file), "--no-progress"]
                running[stage] = subprocess.Popen(command, env=env, pass_fds=inherited)
                todo.remove(stage)
                log(f"{stage}: started (process {running[stage].pid}, {threads} thread{'s' * (threads > 1)})")
            if not running:  # nothing can start and nothing runs: a stage's input is missing and will not come
                raise StageFailed(f"cannot train {', '.join(todo)}: their inputs are not trained")
            time.sleep(1)
            for stage, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[stage]
                if process.returncode != 0:
                    raise StageFailed(f"{stage} failed (exit code {process.returncode}); see its output above")
                done[stage] = json.loads((out / "family.json").read_text())["trained"][stage]  # its process logged it
    finally:
        for process in running.values():  # on failure or Ctrl-C: stop the others at their last checkpoint
            process.terminate()
        for process in running.values():
            process.wait()
    return done
