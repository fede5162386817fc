"""Pool balancing: the GPU split that equalises the pools' rates, from a run's measured per-image stage times."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.balance import main, split, split_nodes
from jobs.manifest import MANIFEST_DIR


def test_whole_gpus_go_to_the_pools_in_proportion_to_their_work():
    plan = split(8, prior_s=1.0, decoder_s=3.0)
    assert (plan.prior_actors, plan.decoder_actors) == (2, 6) and plan.images_per_s == pytest.approx(2.0)
    lopsided = split(2, 5.0, 0.1, max_per_gpu=1)
    assert (lopsided.prior_actors, lopsided.decoder_actors) == (1, 1)  # one each at least
    packed = split(2, 5.0, 0.1)  # packing gives Stage C all but a quarter GPU
    assert (packed.prior_actors, packed.decoder_actors, packed.prior_gpus) == (7, 1, 0.25)
    # No other split of 8 does better.
    assert all(min(n / 1.0, (8 - n) / 3.0) <= plan.images_per_s for n in range(1, 8))


def test_packing_actors_on_gpus_when_whole_gpus_leave_a_pool_idle():
    # 2 GPUs, Stage C half of Stage B/A's time: whole GPUs give 1 + 1 (Stage C idles half the time, 1/decoder_s);
    # three actors per GPU give 2 + 4 at 0.33 GPU each and both pools busy: 2 GPUs / (prior_s + decoder_s).
    plan = split(2, prior_s=1.0, decoder_s=2.0)
    assert (plan.prior_actors, plan.decoder_actors, plan.prior_gpus, plan.decoder_gpus) == (2, 4, 0.33, 0.33)
    assert plan.images_per_s == pytest.approx(2 / 3) and plan.images_per_s >= 1.05 * (1 / 2.0)
    assert plan.prior_actors * plan.prior_gpus + plan.decoder_actors * plan.decoder_gpus <= 2  # it fits
    # Whole GPUs only, when asked, or when packing gains under 5 % (8 GPUs in 1 : 3 split exactly).
    assert (split(2, 1.0, 2.0, max_per_gpu=1).prior_actors, split(2, 1.0, 2.0, max_per_gpu=1).prior_gpus) == (1, 1.0)
    assert split(8, 1.0, 3.0).prior_gpus == 1.0
    # The smallest packing that reaches the best rate is kept: 2 per GPU is as good as 4 here.
    assert split(3, prior_s=1.0, decoder_s=1.0).prior_gpus == 0.5
    with pytest.raises(ValueError, match="max_per_gpu 0"):
        split(2, 1.0, 1.0, max_per_gpu=0)


def test_one_gpu_is_shared_in_proportion():
    plan = split(1, prior_s=1.0, decoder_s=3.0)
    assert (plan.prior_actors, plan.decoder_actors, plan.prior_gpus, plan.decoder_gpus) == (1, 1, 0.25, 0.75)
    assert "prior_pool:\n  actors: 1\n  gpus: 0.25" in plan.yaml()
    with pytest.raises(ValueError, match="must be positive"):
        split(0, 1.0, 1.0)


def test_nodes_that_each_serve_one_pool_are_split_whole():
    """cluster.yaml's node types: a node's GPUs all go to one pool, so the split is in nodes (one actor per GPU)."""
    plan = split_nodes(24, 8, prior_s=1.0, decoder_s=0.75)  # 3 nodes: 2 + 1 gives min(16, 10.7); 1 + 2 min(8, 21.3)
    assert (plan.prior_actors, plan.decoder_actors, plan.prior_gpus, plan.decoder_gpus) == (16, 8, 1.0, 1.0)
    assert plan.nodes == (2, 1, 8) and plan.images_per_s == pytest.approx(8 / 0.75)
    assert "# nodes: 2 for the Stage C pool and 1 for the Stage B/A pool, 8 GPUs each" in plan.yaml()
    assert "top-level max_workers at least 3" in plan.yaml()
    assert "packed" not in plan.yaml()
    assert split_nodes(16, 8, 1.0, 100.0).nodes == (1, 1, 8)  # each pool keeps a node, however lopsided
    with pytest.raises(ValueError, match="both must be positive"):
        split_nodes(16, 8, 0.0, 1.0)
    for gpus in (8, 12):  # one node only; not whole nodes
        with pytest.raises(ValueError, match="the GPUs must be whole nodes, at least one per pool"):
            split_nodes(gpus, 8, 1.0, 1.0)


def test_the_command_reads_a_runs_manifests(tmp_path, capsys):
    rows = {"status": ["ok", "ok", "ok", "error"], "prior_s": [0.5, 0.6, 0.4, None], "decoder_s": [1.5, 1.4, 1.6, None]}
    (tmp_path / MANIFEST_DIR).mkdir(parents=True)
    pq.write_table(pa.table(rows), tmp_path / MANIFEST_DIR / "part-a.parquet")
    assert main(["--run", str(tmp_path), "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "Stage C 0.5 s, Stage B/A 1.5 s" in out and "prior_pool:\n  actors: 1\n" in out
    assert "decoder_pool:\n  actors: 3\n" in out
    assert "keep their batch_size and resources" in out and "shared GPUs" not in out  # no _SUCCESS: nothing known
    # A run whose Stage C actors shared GPUs measured them slower than alone: said so.
    summary = {"config": {"prior_pool": {"gpus": 0.5}, "decoder_pool": {"gpus": 1}}}
    (tmp_path / "_SUCCESS").write_text(json.dumps(summary))
    assert main(["--run", str(tmp_path), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "in the last run on this output the Stage C pool shared GPUs" in out
    assert "resources: {stage_c: 0.5}" in out  # 2 GPUs for 0.5 s + 1.5 s: packed, so pinned pools ask for a share
    assert "(or may have" not in out  # a set fraction shares for sure
    # Runs since the summary records the GPUs the actors had: gpus auto resolved, no guessing from the settings.
    auto = {"prior_pool": {"gpus": "auto"}, "decoder_pool": {"gpus": "auto"}}
    for had, note in [
        ({"prior_pool": 0.5, "decoder_pool": 0.5}, "the Stage C pool and the Stage B/A pool shared GPUs, so"),
        ({"prior_pool": 1, "decoder_pool": 1}, None),
        ({"prior_pool": 0, "decoder_pool": 0}, "# note: the last run on this output had no GPU (a CPU run)"),
        (None, None),  # a run that rendered nothing (it only wrote _SUCCESS): no pool ran, nothing to say of it
    ]:
        (tmp_path / "_SUCCESS").write_text(json.dumps({"config": auto, "actor_gpus": had}))
        assert main(["--run", str(tmp_path), "--gpus", "2"]) == 0
        out = capsys.readouterr().out
        assert (note in out) if note else ("# note" not in out), (had, out)
    (tmp_path / "_SUCCESS").write_text(json.dumps({"config": auto}))  # before: the settings say auto, maybe shared
    assert main(["--run", str(tmp_path), "--gpus", "2"]) == 0
    assert "the Stage C pool and the Stage B/A pool shared GPUs (or may have: gpus auto" in capsys.readouterr().out
    # Nodes of 4 GPUs, each serving one pool: 0.5 s + 1.5 s per image on 3 nodes gives Stage C one, Stage B/A two.
    assert main(["--run", str(tmp_path), "--gpus", "12", "--node-gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "# nodes: 1 for the Stage C pool and 2 for the Stage B/A pool, 4 GPUs each" in out
    assert "prior_pool:\n  actors: 4\n  gpus: 1\n" in out and "decoder_pool:\n  actors: 8\n  gpus: 1\n" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--run", str(tmp_path), "--gpus", "10", "--node-gpus", "4"])
    assert exit_.value.code == 2
    assert "--gpus: 10 is not allowed with --node-gpus 4: give whole nodes" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "empty"), "--gpus", "4"]) == 2
    assert "no manifests found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--run", str(tmp_path), "--gpus", "0"])
    assert exit_.value.code == 2 and "--gpus: 0 is not allowed; use 1 or more" in capsys.readouterr().err
    # Manifests without stage timings, or a part that is not Parquet: said so, with the part named.
    pq.write_table(pa.table({"status": ["ok"]}), tmp_path / MANIFEST_DIR / "part-a.parquet")
    assert main(["--run", str(tmp_path), "--gpus", "2"]) == 2
    assert "hold no stage timings (prior_s, decoder_s)" in capsys.readouterr().err
    (tmp_path / MANIFEST_DIR / "part-a.parquet").write_bytes(b"PAR1 not really")
    assert main(["--run", str(tmp_path), "--gpus", "2"]) == 2
    assert "part-a.parquet: not a readable manifest part" in capsys.readouterr().err
