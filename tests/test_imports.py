"""What the pipeline's processes import: the CPU tasks no torch and no transformers, the Stage B/A actors no
transformers (each would spend seconds of start-up loading them); and the sampler names the requests are checked
against are the sampler's own."""

import subprocess
import sys

from cascade import gdf
from cascade.request import SAMPLER_NAMES

CPU_TASK_MODULES = ("jobs.config", "jobs.inputs", "jobs.manifest", "workers.writer", "workers.storage")


def test_the_cpu_tasks_modules_load_without_the_model_code():
    script = (
        f"import sys; import {', '.join(CPU_TASK_MODULES)}; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_a_decoder_actor_loads_no_text_model_code():
    script = (
        "import sys; from workers.models import load_part; m = load_part('tiny', False, 'auto', 'decoder'); "
        "assert m.stage_b is not None and m.text_encoder is None; print('transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_requests_are_checked_against_the_samplers_that_exist():
    assert set(SAMPLER_NAMES) == set(gdf.SAMPLERS)
