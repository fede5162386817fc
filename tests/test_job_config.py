"""The job's configuration: YAML and flags, validated in full, with errors that name the key and suggest fixes."""

import re

import pytest

from cascade.geometry import DEFAULT_MODEL, family_geometry
from jobs.config import ConfigError, from_mapping, load_yaml, resolve
from jobs.generate import build_parser


def parse(*argv, tmp_path=None, yaml_text=None):
    args = list(argv)
    if yaml_text is not None:
        path = tmp_path / "job.yaml"
        path.write_text(yaml_text)
        args += ["--config", str(path)]
    return resolve(build_parser().parse_args(args))


def test_flags_override_the_file(tmp_path):
    config = parse(
        "--prompts", "p.parquet", "--prior-steps", "7", "--prior-pool-actors", "3", "--no-report",
        tmp_path=tmp_path,
        yaml_text="out: s3://bucket/run\nprior_steps: 30\nprior_pool: {actors: 2, batch_size: 8, gpus: 0.5}\n",
    )  # fmt: skip
    assert (config.prompts, config.out, config.prior_steps) == ("p.parquet", "s3://bucket/run", 7)
    assert (config.prior_pool.actors, config.prior_pool.batch_size, config.prior_pool.gpus) == (3, 8, 0.5)
    assert config.report is False and config.decoder_pool.actors == 1


def test_pool_resources_flag_takes_json():
    config = parse("--prompts", "p", "--out", "o", "--decoder-pool-resources", '{"stage_b": 1}')
    assert config.decoder_pool.resources == {"stage_b": 1}


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--prior-pool-resources", "{bad", "argument --prior-pool-resources: '{bad' is not a JSON mapping; give"),
        # null would read as "not given": the file's resources would stay, the flag ignored
        ("--prior-pool-resources", "null", "argument --prior-pool-resources: 'null' is not a JSON mapping; give"),
        ("--decoder-pool-gpus", "half", "argument --decoder-pool-gpus: 'half' is not allowed; use 'auto', 0, a"),
        ("--prior-stepz", "3", "unrecognized arguments: --prior-stepz (did you mean --prior-steps?) 3"),
        ("--decoder-pool-batchsize", "2", "--decoder-pool-batchsize (did you mean --decoder-pool-batch-size?) 2"),
        ("--bogus", "2", "unrecognized arguments: --bogus 2\n"),  # nothing near: no guess
        # A prefix of a flag is not taken for it (argparse's default): it would silently set a setting not named.
        ("--prior-step", "3", "unrecognized arguments: --prior-step (did you mean --prior-steps?) 3"),
        ("--negative", "x", "unrecognized arguments: --negative (did you mean --negative-prompt?) x"),
    ],
)
def test_flags_that_do_not_parse_say_what_is_allowed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--prompts", "p", "--out", "o", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_keys_suggest_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="'prior_step' is not a known setting; did you mean 'prior_steps'"):
        from_mapping({"prompts": "p", "out": "o", "prior_step": 3})
    with pytest.raises(ConfigError, match="prior_pool: 'actor' is not a known setting; did you mean 'actors'"):
        from_mapping({"prompts": "p", "out": "o", "prior_pool": {"actor": 2}})
    # A pool's setting at the top level names where it goes, rather than the nearest top-level key (shard_size).
    with pytest.raises(ConfigError, match="'batch_size' is a setting of each pool: set prior_pool.batch_size and "):
        from_mapping({"prompts": "p", "out": "o", "batch_size": 3})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("width", 1000, "width: 1000 is not supported; use an integer multiple of 32 from 256 to 2048"),
        ("height", -64, "height: -64 is not supported"),
        ("prior_steps", 0, "prior_steps: 0 is not allowed; use an integer from 1 to 1000"),
        ("decoder_cfg", float("nan"), "decoder_cfg: nan"),
        ("seed", 2**63, "seed: 9223372036854775808"),
        ("num_images", 0, "num_images: 0"),
        ("image_format", "gif", "image_format: 'gif' is not allowed; use one of png, webp, jpeg"),
        ("quality", 0, "quality: 0"),
        ("prompts", "", "prompts: missing; give --prompts (or prompts: in the --config file)"),
        ("prompts", "  ", "prompts: '  ' is not allowed"),
        ("overwrite", "yes", "overwrite: 'yes' is not allowed; use true or false"),
        ("out", "s3://ab/run", "out: 's3://ab/run' is not allowed; an s3:// URL starts with a bucket name of at least"),
        ("prompts", "s3:///p.parquet", "prompts: 's3:///p.parquet' is not allowed; an s3:// URL starts with a bucket"),
        ("lite", True, "lite: True is not allowed; it picks the lite files of a weights folder, and model 'tiny' is"),
    ],
)
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError) as e:
        from_mapping({"prompts": "p", "out": "o", "model": "tiny", key: value})  # the official sizes' rule
    assert message in str(e.value)


def test_bad_pool_values_are_named():
    with pytest.raises(ConfigError, match=r"prior_pool.gpus: 1.5 is not allowed"):
        from_mapping({"prompts": "p", "out": "o", "prior_pool": {"gpus": 1.5}})
    with pytest.raises(ConfigError, match=r"decoder_pool.actors: 0"):
        from_mapping({"prompts": "p", "out": "o", "decoder_pool": {"actors": 0}})
    with pytest.raises(ConfigError, match=r"decoder_pool.resources"):
        from_mapping({"prompts": "p", "out": "o", "decoder_pool": {"resources": {"stage_b": -1}}})
    with pytest.raises(ConfigError, match=r"prior_pool.resources: \{'GPU': 1\} is not allowed; GPU cannot go"):
        from_mapping({"prompts": "p", "out": "o", "prior_pool": {"resources": {"GPU": 1}}})  # Ray refuses it later
    with pytest.raises(ConfigError, match="prior_pool: 3 is not allowed; use a mapping of actors, batch_size"):
        from_mapping({"prompts": "p", "out": "o", "prior_pool": 3})


@pytest.mark.parametrize(
    "setting, value",
    [
        ({"prior_pool": {"gpus": 0.00001}}, "prior_pool.gpus: 1e-05 is not allowed; use 'auto', 0, a fraction from"),
        ({"decoder_pool": {"cpus": 0.00005}}, "decoder_pool.cpus: 5e-05 is not allowed; use 0 or a number from 0.0001"),
        ({"writer_cpus": 0.00001}, "writer_cpus: 1e-05 is not allowed; use a number from 0.0001"),
        ({"prior_pool": {"resources": {"stage_c": 0.00001}}}, "an amount of at least 0.0001"),
        ({"prior_pool": {"resources": {"": 1}}}, "prior_pool.resources: {'': 1} is not allowed; use a mapping of"),
    ],
)
def test_amounts_finer_than_ray_schedules_are_refused_before_ray_starts(setting, value):
    """Ray refuses a fractional amount below 0.0001 only as the actors start, which the job took for a failure to
    resume from (exit 1, "rerun"), and a rerun met again."""
    with pytest.raises(ConfigError) as e:
        from_mapping({"prompts": "p", "out": "o", **setting})
    assert value in str(e.value)
    unit = {"gpus": 0.0001, "cpus": 0.0001, "resources": {"stage_c": 0.0001}}
    config = from_mapping({"prompts": "p", "out": "o", "writer_cpus": 0.0001, "prior_pool": unit})  # Ray's unit
    assert config.prior_pool.gpus == config.writer_cpus == 0.0001


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--seed", "1e3", "seed: '1e3' is not allowed; use an integer from 0 to 2**63 - 1"),
        ("--prior-cfg", "abc", "prior_cfg: 'abc' is not allowed; use a finite number from 0 to 100"),
        ("--prior-pool-actors", "x", "prior_pool.actors: 'x' is not allowed; use an integer of 1 or more"),
        ("--writer-cpus", "many", "writer_cpus: 'many' is not allowed; use a number from 0.0001"),
        ("--width", "64.0", "width: '64.0' is not supported; use an integer multiple of 16 from 64 to 256"),
    ],
)
def test_number_flags_that_do_not_parse_say_what_is_allowed(flag, value, message):
    with pytest.raises(ConfigError) as e:
        parse("--prompts", "p", "--out", "o", flag, value)
    assert message in str(e.value)
    assert parse("--prompts", "p", "--out", "o", "--prior-cfg", "1.5e1").prior_cfg == 15.0


@pytest.mark.parametrize("url", ["s3a://bucket/run", "S3://bucket/run", "s3:/bucket/run", "gs://bucket/run"])
def test_urls_the_job_does_not_read_are_refused_rather_than_made_local_folders(url):
    """`s3a://b/run` as a local path is a folder named "s3a:" in the working directory (under ray job submit, the
    head's temporary one): the job exited 0 with the images where nobody would look."""
    for name in ("out", "prompts"):
        with pytest.raises(ConfigError, match=f"{name}: '{url}' is not allowed; give an s3://bucket/prefix URL"):
            from_mapping({"prompts": "p", "out": "o", name: url})
    from_mapping({"prompts": "C:/prompts", "out": "./out:1/x"})  # a drive letter or a colon in a folder is a path


@pytest.mark.parametrize("url", ["s3://bkt/dd//ee", "s3://bkt//x", "s3://bkt/a/../b", "s3://bkt/./x", "s3://bkt/a\\b"])
def test_s3_prefixes_that_servers_store_differently_are_refused(url):
    """SeaweedFS stores dd//ee/x as dd/ee/x and then lists nothing under dd//ee/: a rerun found none of its own
    manifests, rendered everything again and exited 0 with two rows per image."""
    with pytest.raises(ConfigError, match="write the key prefix without empty, '.' or '..' parts and without back"):
        from_mapping({"prompts": "p", "out": url})
    for fine in ("s3://bkt", "s3://bkt/", "s3://bkt/a/b/", "s3://bkt/a/b"):
        assert from_mapping({"prompts": "p", "out": fine}).out == fine
    assert from_mapping({"prompts": "s3://bkt/in/**/*.parquet", "out": "o"}).prompts == "s3://bkt/in/**/*.parquet"


def test_credentials_in_a_url_are_refused_without_being_shown(capsys):
    for url in ("s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/run", "s3a://AKIAEXAMPLE:SECRETEXAMPLE@bucket/run"):
        with pytest.raises(ConfigError) as e:
            parse("--prompts", "p", "--out", url)
        assert "credentials in it (user:secret@...) is not allowed, and is not shown here" in str(e.value)
        assert "SECRETEXAMPLE" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    for presigned in ("s3://bucket/run?X-Amz-Signature=SECRETEXAMPLE", "s3://bucket?X-Amz-Signature=SECRETEXAMPLE"):
        with pytest.raises(ConfigError) as e:
            parse("--prompts", "p", "--out", presigned)
        shown = presigned.partition("?")[0]
        assert f"out: '{shown}?...' is not allowed; an s3:// URL has no query string" in str(e.value)
        assert "SECRETEXAMPLE" not in str(e.value)


def test_an_empty_config_flag_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="--config: '' is not allowed; give the path of a YAML file"):
        parse("--prompts", "p", "--out", "o", "--config", "")


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(listy)
    # The safe loader: no Python objects from YAML.
    evil = tmp_path / "evil.yaml"
    evil.write_text("prompts: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(evil)


def test_yaml_values_read_as_written_yaml_1_2_core(tmp_path):
    """PyYAML follows YAML 1.1, where 1e3 is a string, 010 is octal 8, 1:30 is 90, no is false: a config would
    run with settings the user did not write, or be refused with a value they did not write."""
    config = parse(
        "--prompts", "p", "--out", "o", tmp_path=tmp_path,
        yaml_text="seed: 010\nprior_cfg: 5e0\ndecoder_cfg: 1.5E-1\nnegative_prompt: no\nmanifest_seconds: 1.2e2\n"
        "segment_rows: 0x10\nquality: 0o17\nreport: false\noverwrite: True\n",
    )  # fmt: skip
    assert (config.seed, config.prior_cfg, config.decoder_cfg, config.negative_prompt) == (10, 5.0, 0.15, "no")
    assert (config.manifest_seconds, config.segment_rows, config.quality) == (120.0, 16, 15)
    assert (config.report, config.overwrite) == (False, True)
    tagged = parse(
        "--prompts", "p", "--out", "o", tmp_path=tmp_path, yaml_text="seed: !!int 0b11\nquality: !!int '90'\n"
    )
    assert (tagged.seed, tagged.quality) == (3, 90)  # an explicit tag of YAML 1.1's forms reads as before
    for text, message in [
        ("prior_cfg: 1e3\n", "prior_cfg: 1000.0 is not allowed"),
        ("seed: 1:30\n", "seed: '1:30' is not allowed"),
        ("overwrite: yes\n", "overwrite: 'yes' is not allowed; use true or false"),
        ("seed: 2024-01-01\n", "seed: '2024-01-01' is not allowed"),
        ("prior_cfg: .inf\n", "prior_cfg: inf is not allowed"),
        ("negative_prompt: ~\n", "negative_prompt: None is not allowed"),
        ("seed: !!int abc\n", "is not valid YAML: a tagged value (ValueError: invalid literal for int() with base"),
        ("report: !!bool maybe\n", "is not valid YAML: a tagged value (KeyError: 'maybe')"),
        ("seed: !!int\n", "is not valid YAML: a tagged value (IndexError"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse("--prompts", "p", "--out", "o", tmp_path=tmp_path, yaml_text=text)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("negative_prompt: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 20\); save it"):
        load_yaml(latin1)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("negative_prompt: café\n".encode("utf-8-sig"))  # what Windows editors write
    assert load_yaml(bom) == {"negative_prompt": "café"}


def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path):
    """Plain YAML keeps the last of two equal keys, so a pool would silently lose one of its settings."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("prior_pool:\n  resources: {stage_c: 1}\n  actors: 2\n  resources: {stage_b: 1}\n")
    where = r"(?s)twice.yaml is not valid YAML: .*'resources' is given twice.*twice.yaml\", line 4"
    with pytest.raises(ConfigError, match=where):
        load_yaml(twice)
    top = tmp_path / "top.yaml"
    top.write_text("steps: 10\nprior_pool: {actors: 1, resources: {stage_c: 1}}\nsteps: 20\n")
    with pytest.raises(ConfigError, match="'steps' is given twice"):
        load_yaml(top)
    # The same key in two different mappings, and YAML's merge key, are fine.
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {actors: 2}\nprior_pool: {<<: *b, gpus: 1}\ndecoder_pool: {<<: *b, actors: 3}\n")
    assert load_yaml(fine)["decoder_pool"] == {"actors": 3}
    # A merged mapping that overrides a key of its own merge, merged again elsewhere (constructing merges flattens
    # them in place: a check made while constructing saw that key twice).
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "prior_pool:\n  resources: &r {<<: {stage_c: 1}, stage_c: 2}\ndecoder_pool: {resources: {<<: *r}}\n"
    )
    assert load_yaml(nested)["decoder_pool"] == {"resources": {"stage_c": 2}}
    # Keys YAML reads as one value, written two ways, are one key given twice.
    for text, key in [("steps: 1\n1: a\n01: b\n", "1"), ("true: 1\nTrue: 2\n", "True"), ("~: 1\nnull: 2\n", "None")]:
        other = tmp_path / "other.yaml"
        other.write_text(text)
        with pytest.raises(ConfigError, match=f"the key {key} is given twice"):
            load_yaml(other)


def test_public_config_round_trips():
    config = from_mapping({"prompts": "p", "out": "o", "prior_pool": {"actors": 2}})
    again = from_mapping(config.public())
    assert again == config


def test_size_flags_are_integers_defaulting_to_the_family_size():
    assert parse("--prompts", "p", "--out", "o", "--model", "tiny", "--width", "512").width == 512
    assert parse("--prompts", "p", "--out", "o", "--model", "tiny").height == 1024  # the official geometry
    default = parse("--prompts", "p", "--out", "o")
    assert default.height == family_geometry(DEFAULT_MODEL).default_size and default.model == DEFAULT_MODEL


def test_max_actors_is_zero_or_at_least_actors():
    config = from_mapping({"prompts": "p", "out": "o", "prior_pool": {"actors": 2, "max_actors": 4}})
    assert (config.prior_pool.actors, config.prior_pool.max_actors, config.decoder_pool.max_actors) == (2, 4, 0)
    with pytest.raises(ConfigError, match=r"prior_pool.max_actors: 1 .*at least prior_pool.actors \(2\)"):
        from_mapping({"prompts": "p", "out": "o", "prior_pool": {"actors": 2, "max_actors": 1}})
    with pytest.raises(ConfigError, match=r"decoder_pool.max_actors: 'many'"):
        from_mapping({"prompts": "p", "out": "o", "decoder_pool": {"max_actors": "many"}})


def test_compile_is_off_by_default_and_a_yes_no_setting(tmp_path):
    assert parse("--prompts", "p", "--out", "o", tmp_path=tmp_path).compile is False
    assert parse("--prompts", "p", "--out", "o", "--compile", tmp_path=tmp_path).compile is True
    assert (
        parse("--prompts", "p", "--no-compile", tmp_path=tmp_path, yaml_text="out: o\ncompile: true\n").compile is False
    )
    with pytest.raises(ConfigError, match="compile: 'yes'"):
        from_mapping({"prompts": "p", "out": "o", "compile": "yes"})


def test_fp8_is_off_by_default_and_needs_compile(tmp_path, capsys):
    """Without compiled blocks float8's scaling passes are kernels of their own: Stage C measured slower than bf16,
    so `fp8: true` alone is refused (exit 2, before anything starts), from the file as from the flag."""
    from jobs.generate import main

    assert parse("--prompts", "p", "--out", "o").fp8 is False
    refusal = "fp8: True is not allowed; it needs compile: true (--compile): without compiled blocks"
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        parse("--prompts", "p", "--out", "o", "--fp8")
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        parse("--prompts", "p", tmp_path=tmp_path, yaml_text="out: o\nfp8: true\n")
    with pytest.raises(ConfigError, match=re.escape(refusal)):  # a dry run too: it checks the settings it runs with
        parse("--prompts", "p", "--out", "o", "--fp8", "--dry-run")
    assert main(["--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"), "--fp8"]) == 2
    assert f"[generate] error: {refusal}" in capsys.readouterr().err and not (tmp_path / "out").exists()

    assert parse("--prompts", "p", "--out", "o", "--fp8", "--compile").fp8 is True
    assert parse("--prompts", "p", tmp_path=tmp_path, yaml_text="out: o\nfp8: true\ncompile: true\n").fp8 is True
    assert (
        parse("--prompts", "p", "--compile", "--fp8", "--no-fp8", tmp_path=tmp_path, yaml_text="out: o\n").fp8 is False
    )
    with pytest.raises(ConfigError, match="fp8: 'yes' is not allowed; use true or false"):
        from_mapping({"prompts": "p", "out": "o", "fp8": "yes", "compile": True})
    entry = re.search(r"^  --fp8, --no-fp8\s+(.*)$", build_parser().format_help(), re.MULTILINE)
    assert entry and entry.group(1) == "(default False)"  # as --compile's


def test_fp8_is_an_image_setting_and_compile_is_not():
    """float8 products change the pixels, compiling does not: a resume under another fp8 warns that the output
    mixes settings (manifest.settings_changes)."""
    from jobs.manifest import settings_changes

    plain = from_mapping({"prompts": "p", "out": "o", "compile": True})
    fast = from_mapping({"prompts": "p", "out": "o", "compile": True, "fp8": True})
    assert fast.image_settings()["fp8"] is True and "compile" not in fast.image_settings()
    assert settings_changes([plain.image_settings()], fast.image_settings()) == ["fp8 False (now True)"]
    assert settings_changes([fast.image_settings()], from_mapping(fast.public()).image_settings()) == []


@pytest.mark.parametrize(
    "gpus, pools, expected",
    [
        (0, [("auto", 1), ("auto", 1)], (0.0, 0.0)),  # no GPUs: CPU actors
        (2, [("auto", 1), ("auto", 1)], (1.0, 1.0)),  # one GPU each
        (1, [("auto", 1), ("auto", 1)], (0.5, 0.5)),  # one GPU: both pools share it, neither waits forever
        (2, [("auto", 2), ("auto", 1)], (0.5, 0.5)),  # three actors on two GPUs: two to a GPU
        (8, [("auto", 4), ("auto", 3)], (1.0, 1.0)),
        (4, [(1.0, 2), ("auto", 4)], (1.0, 0.5)),  # the two GPUs the explicit pool leaves, for four actors
        (3, [(0.5, 2), ("auto", 5)], (0.5, 0.33)),  # two left for five: three to a GPU (3 x 0.33 fits in one)
        (1, [(0.5, 1), ("auto", 1)], (0.5, 0.5)),  # half a GPU left: the auto actor takes it
        (1, [(0.4, 1), ("auto", 2)], (0.4, 0.3)),  # 0.6 left for two
        (1, [(1.0, 1), ("auto", 1)], (1.0, 1.0)),  # none left: auto stays 1 (the job warns that actors wait)
    ],
)
def test_auto_gpus_share_the_gpus_there_are_when_they_are_fewer_than_the_actors(gpus, pools, expected):
    from jobs.config import PoolConfig
    from jobs.generate import auto_gpus, pool_args

    prior, decoder = (PoolConfig(gpus=g, actors=n) for g, n in pools)
    auto = auto_gpus((prior, decoder), gpus)
    assert (pool_args(prior, auto)["num_gpus"], pool_args(decoder, auto)["num_gpus"]) == expected


def test_a_private_ray_has_cpus_for_the_waiting_tasks_a_writer_and_the_actors_at_once():
    """On 2 CPUs the segment's read and the cut before the Stage B/A pool held both, and no image was written until
    the segment was read (none in 145 s for 200,000 rows). A private Ray gets slots for them, a writer and the
    pools' actors; a bigger machine keeps its own count."""
    from jobs.generate import local_cpus

    paths = {"prompts": "p", "out": "o"}
    assert local_cpus(from_mapping(paths), machine=2) == 3
    assert local_cpus(from_mapping(paths), machine=16) == 16
    pools = {"prior_pool": {"actors": 2, "cpus": 1}, "decoder_pool": {"cpus": 0.5}}
    busy = from_mapping({**paths, "writer_cpus": 1.5, **pools})
    assert local_cpus(busy, machine=2) == 6  # 2 waiting + 1.5 writer + 2 + 0.5 actors, rounded up


def test_the_job_s_own_ray_refuses_actors_and_writers_past_the_machine_s_cpus_not_its_slots(monkeypatch):
    """The slots beyond the machine's CPUs are for the tasks that wait: pools of 16 CPUs an actor (16 threads each)
    on 2 CPUs are refused, as before those slots, where they ran on 2 cores."""
    import jobs.generate
    import jobs.placement

    monkeypatch.setattr(jobs.generate, "_own_ray", True)
    monkeypatch.setattr(jobs.generate, "_machine_cpus", 2)
    monkeypatch.setattr(jobs.placement, "live_nodes", lambda: [{"CPU": 35.0, "memory": 1e9}])
    needs = {"Stage C pool": {"GPU": 0.0, "CPU": 16.0}, "Stage B/A pool": {"GPU": 0.0, "CPU": 16.0}}
    with pytest.raises(jobs.generate.NeverFits, match=r"this machine \(CPU 2\) can never run the Stage C pool"):
        jobs.generate.check_fits_here({**needs, "writer tasks": {"CPU": 1.0}})
    fits = {"Stage C pool": {"GPU": 0.0, "CPU": 0.5}, "Stage B/A pool": {"GPU": 0.0, "CPU": 0.5}}
    jobs.generate.check_fits_here({**fits, "writer tasks": {"CPU": 1.0}})  # 2 CPUs for them: no error


def test_ray_data_s_no_progress_limit_leaves_the_waiting_to_the_node_watch():
    """Ray Data ends an execution that moves no block for 30 minutes by default: with node_wait_seconds 0 ("wait
    forever" for nodes) it must not, and otherwise it must come well after the node watch's own limit."""
    from jobs.generate import NO_PROGRESS_MARGIN_S, no_progress_timeout

    assert no_progress_timeout(0, 1800) == -1
    assert no_progress_timeout(600, 1800) == 600 + NO_PROGRESS_MARGIN_S >= 1800
    assert no_progress_timeout(7200, 1800) == 7200 + NO_PROGRESS_MARGIN_S


def test_help_lists_the_names_a_setting_takes():
    text = build_parser().format_help()
    for flag, names in [("--sampler", "ddpm, ddim"), ("--layout", "files, webdataset"), ("--dtype", "auto, bf16")]:
        entry = re.search(rf"^  {flag} [A-Z_]+\s+(.*)$", text, re.MULTILINE)  # (the usage line names it first)
        assert entry and f"one of {names}" in entry.group(1), flag


def test_a_relative_out_is_refused_where_ray_job_submit_unpacked_the_working_dir(tmp_path, monkeypatch):
    """Under `ray job submit --working-dir .` the job runs in Ray's copy of that folder, in Ray's session folder,
    which Ray shares with later jobs and deletes: a relative --out would land there, not where the user submitted
    from. Absolute paths and s3:// are taken there; elsewhere a relative --out is the user's folder, as always."""
    from jobs.config import in_ray_working_dir

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    assert in_ray_working_dir(str(copy / "sub")) and not in_ray_working_dir(str(tmp_path / "runtime_resources"))
    base = {"prompts": "prompts.parquet"}
    from_mapping({**base, "out": "rel-out/"})  # here: the user's own folder
    monkeypatch.chdir(copy)
    with pytest.raises(
        ConfigError, match=r"out: 'rel-out/' is not allowed; it is relative, and this job runs in Ray's"
    ):
        from_mapping({**base, "out": "rel-out/"})
    for out in (str(tmp_path / "out"), "s3://bucket/run-1", "~/renders"):
        assert from_mapping({**base, "out": out}).out == out
