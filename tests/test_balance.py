"""Pool balancing: the GPU split that equalises the pools' rates, from a run's measured per-image stage times."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.balance import main, split
from jobs.manifest import MANIFEST_DIR


def test_whole_gpus_go_to_the_pools_in_proportion_to_their_work():
    plan = split(8, prior_s=1.0, decoder_s=3.0)
    assert (plan.prior_actors, plan.decoder_actors) == (2, 6) and plan.images_per_s == pytest.approx(2.0)
    assert (split(2, 5.0, 0.1).prior_actors, split(2, 5.0, 0.1).decoder_actors) == (1, 1)  # one each at least
    # No other split of 8 does better.
    assert all(min(n / 1.0, (8 - n) / 3.0) <= plan.images_per_s for n in range(1, 8))


def test_one_gpu_is_shared_in_proportion():
    plan = split(1, prior_s=1.0, decoder_s=3.0)
    assert (plan.prior_actors, plan.decoder_actors, plan.prior_gpus, plan.decoder_gpus) == (1, 1, 0.25, 0.75)
    assert "prior_pool:\n  actors: 1\n  gpus: 0.25" in plan.yaml()
    with pytest.raises(ValueError, match="must be positive"):
        split(0, 1.0, 1.0)


def test_the_command_reads_a_runs_manifests(tmp_path, capsys):
    rows = {"status": ["ok", "ok", "ok", "error"], "prior_s": [0.5, 0.6, 0.4, None], "decoder_s": [1.5, 1.4, 1.6, None]}
    (tmp_path / MANIFEST_DIR).mkdir(parents=True)
    pq.write_table(pa.table(rows), tmp_path / MANIFEST_DIR / "part-a.parquet")
    assert main(["--run", str(tmp_path), "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "Stage C 0.5 s, Stage B/A 1.5 s" in out and "prior_pool:\n  actors: 1\n" in out
    assert "decoder_pool:\n  actors: 3\n" in out
    assert main(["--run", str(tmp_path / "empty"), "--gpus", "4"]) == 2
    assert "no manifests found" in capsys.readouterr().err
