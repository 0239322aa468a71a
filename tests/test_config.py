import pytest

from cellsynth.config import PipelineConfig, apply_overrides, config_from_dict, load_config
from cellsynth.errors import ConfigError


def test_empty_file_gives_embedded_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.run.lake_root == "./lake"
    assert cfg.runtime.spark.master == "local[*]"
    assert cfg.lake.engine == "delta-rs"


def test_local_yaml_is_valid():
    cfg = load_config("conf/local.yaml")
    assert cfg.runtime.ray.n_actors * cfg.runtime.ray.cpus_per_actor < cfg.runtime.ray.num_cpus


def test_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"^density\.bandwith_m: unknown key$"):
        config_from_dict({"density": {"bandwith_m": 3}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"radio\.n_steps: .*integer.*got 'many'"):
        config_from_dict({"radio": {"n_steps": "many"}})


def test_out_of_range_names_key():
    with pytest.raises(ConfigError, match=r"density\.bandwidth_grid_m: Input should be greater than 0, got -2"):
        config_from_dict({"density": {"bandwidth_grid_m": [25, -2]}})


def test_cross_field_check_names_field():
    with pytest.raises(ConfigError, match=r"ingest\.rsrp_range_dbm: expected \[min, max\] with min < max, got \[-44.0, -140.0\]"):
        config_from_dict({"ingest": {"rsrp_range_dbm": [-44, -140]}})


def test_actors_may_not_take_every_cpu():
    with pytest.raises(ConfigError, match=r"runtime\.ray: n_actors \* cpus_per_actor = 2 must stay below num_cpus = 2"):
        config_from_dict({"runtime": {"ray": {"n_actors": 2, "cpus_per_actor": 1}}})


def test_every_problem_reported_once_per_line():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"radio": {"n_steps": 0}, "density": {"foo": 1}, "bar": {}})
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"radio.n_steps", "density.foo", "bar"}


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("radio:\n  n_steps: 10\n")
    cfg = load_config(path, ["radio.n_steps=25", "density.bandwidth_grid_m=[10, 20]", "run.name=x"])
    assert cfg.radio.n_steps == 25
    assert cfg.density.bandwidth_grid_m == (10.0, 20.0)
    assert cfg.run.name == "x"


def test_set_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--set radio\.n_steps: expected key\.path=value"):
        apply_overrides({}, ["radio.n_steps"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_section_hash_tracks_only_named_sections():
    a = PipelineConfig()
    b = config_from_dict({"radio": {"n_steps": 7}})
    assert a.section_hash("density") == b.section_hash("density")
    assert a.section_hash("radio") != b.section_hash("radio")


def test_secrets_come_from_environment_and_stay_out_of_dumps(monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cr3t")
    cfg = config_from_dict({"lake": {"storage_options_env": {"AWS_SECRET_ACCESS_KEY": "MY_KEY"}}})
    assert cfg.storage_options()["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "s3cr3t" not in cfg.model_dump_json()
