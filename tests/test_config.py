import glob
from pathlib import Path

import numpy as np
import pytest

from cellsynth.config import PipelineConfig, apply_overrides, config_from_dict, load_config
from cellsynth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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


def test_an_empty_generate_windows_list_is_a_config_error():
    # [] passed, generate wrote nothing and failed after training: "every window has zero training reports"
    with pytest.raises(ConfigError, match=r"^generate\.windows: expected at least one window name; leave it unset \(null\)"):
        config_from_dict({"generate": {"windows": []}})
    assert config_from_dict({"generate": {"windows": None}}).generate.windows is None
    assert config_from_dict({"generate": {"windows": ["h00_06"]}}).generate.windows == ("h00_06",)


def test_a_key_given_twice_in_a_file_is_a_config_error_naming_it(tmp_path):
    # PyYAML keeps the last: a second `radio:` section replaced the whole first one without a word
    path = tmp_path / "c.yaml"
    path.write_text("radio:\n  n_steps: 5\ndensity:\n  student: false\nradio:\n  min_measurements: 3\n")
    with pytest.raises(ConfigError, match=r"^config: .*c\.yaml: key 'radio' given twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("run:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'seed' given twice \(lines 2 and 3\)"):
        load_config(path)
    # a YAML merge may still be overridden
    path.write_text("x-base: &b {seed: 1, name: merged}\nrun:\n  <<: *b\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"^x-base: unknown key$"):
        load_config(path)
    path.write_text("run:\n  <<: {seed: 1, name: merged}\n  seed: 2\n")
    cfg = load_config(path)
    assert (cfg.run.seed, cfg.run.name) == (2, "merged")


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


# ------------------------------------------------------------------------------ renamed keys
@pytest.mark.parametrize("old, new, value", [
    ("evaluate.test_fraction", "split.test_fraction", 0.2),
    ("evaluate.spatial_block_m", "split.block_m", 300.0),
    ("evaluate.privacy_guard", "privacy.guard", False),
    ("generate.publish_despite_privacy", "privacy.publish_despite_guard", True),
    ("generate.privacy_min_dcr_ratio", "privacy.min_dcr_ratio", 0.8),
    ("generate.privacy_confidence", "privacy.confidence", 0.9),
    ("density.neighbour_radius_m", "generate.neighbour_radius_m", 1500.0),
])
def test_old_key_names_still_load_with_one_line_deprecation_warning(old, new, value):
    from cellsynth.config import RENAMED_KEYS
    from cellsynth.errors import ConfigDeprecationWarning

    assert RENAMED_KEYS[old] == new
    with pytest.warns(ConfigDeprecationWarning) as record:
        cfg = load_config(None, [f"{old}={value}"])
    (warning,) = record
    assert str(warning.message) == f"config key {old} is deprecated, use {new} (the old name goes in the next release)"
    section, key = new.split(".")
    assert getattr(getattr(cfg, section), key) == value
    assert cfg == load_config(None, [f"{new}={value}"])  # same config as with the new name


@pytest.mark.parametrize("key, value", [
    ("radio.n_rbf_centres", 12), ("radio.n_weight_samples", 8), ("radio.epistemic_growth_db_per_km", 5.0),
    ("radio.local_cv", False), ("privacy.check_rows", 500), ("privacy.dp_steps", 10), ("privacy.dp_users_per_step", 0.1),
    ("privacy.dp_clip_norm", 2.0), ("privacy.dp_learning_rate", 0.1),
])
def test_keys_nothing_reads_load_with_one_warning_naming_the_key(key, value):
    from cellsynth.errors import ConfigDeprecationWarning

    with pytest.warns(ConfigDeprecationWarning) as record:
        cfg = load_config(None, [f"{key}={value}"])
    (warning,) = record
    assert str(warning.message).startswith(f"config key {key} is unused (")
    assert str(warning.message).endswith(") and goes in the next release; drop it")
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("old, new", [("radio.hidden_units", "radio.n_rbf_centres"),
                                      ("generate.privacy_check_rows", "privacy.check_rows")])
def test_a_key_renamed_to_an_unused_key_says_both(old, new):
    from cellsynth.errors import ConfigDeprecationWarning

    with pytest.warns(ConfigDeprecationWarning) as record:
        cfg = load_config(None, [f"{old}=12"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0] == f"config key {old} is deprecated, use {new} (the old name goes in the next release)"
    assert messages[1].startswith(f"config key {new} is unused (")
    section, key = new.split(".")
    assert getattr(getattr(cfg, section), key) == 12


def test_default_config_and_a_saved_full_config_warn_about_nothing():
    import warnings

    from cellsynth.config import PipelineConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(None, [])
        # A saved config holds every key, the unused ones at their defaults: it reloads silently.
        assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_old_and_new_name_together_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^evaluate\.test_fraction: renamed to split\.test_fraction; give only split\.test_fraction$"):
        load_config(None, ["evaluate.test_fraction=0.2", "split.test_fraction=0.3"])


def test_radio_config_built_directly_accepts_hidden_units_with_a_warning():
    from cellsynth.config import RadioConfig
    from cellsynth.errors import ConfigDeprecationWarning

    with pytest.warns(ConfigDeprecationWarning, match=r"radio\.hidden_units .* radio\.n_rbf_centres"):
        assert RadioConfig(hidden_units=7).n_rbf_centres == 7


def test_split_seed_defaults_to_run_seed_and_can_be_pinned():
    from cellsynth.splits import held_out, split_seed

    ids = np.array([f"r{i}" for i in range(2000)])
    a, b = load_config(None, ["run.seed=7"]), load_config(None, ["run.seed=7", "split.seed=42"])
    assert (split_seed(a), split_seed(b), split_seed(load_config())) == (7, 42, 42)
    # pinned to 42, the split is the default run's split whatever run.seed says
    np.testing.assert_array_equal(held_out(b, ids), held_out(load_config(), ids))
    assert held_out(a, ids).mean() == pytest.approx(0.35, abs=0.04)
    assert (held_out(a, ids) != held_out(b, ids)).any()


def test_section_hash_takes_dotted_keys_and_rejects_unknown_ones():
    a, b = load_config(None, ["run.seed=1"]), load_config(None, ["run.name=other"])
    assert a.section_hash("run.seed") != b.section_hash("run.seed")
    assert a.section_hash("run.name", "split") != b.section_hash("run.name", "split")
    assert load_config().section_hash("run.seed") == b.section_hash("run.seed")
    with pytest.raises(ConfigError, match=r"run\.sead: not a config key"):
        a.section_hash("run.sead")


def test_source_column_key_that_names_no_canonical_column_fails_at_load():
    # `ts:` for `timestamp:` used to pass the config and fail only once Spark had read the files
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.columns: unknown canonical column\(s\) lat, ts \(expected: report_id, ue_id, timestamp"):
        config_from_dict({"sources": {"mdt": {"columns": {"ts": "event_time", "lat": "y", "rsrp_dbm": "rsrp"}}}})
    # easting/northing only where the source is projected
    with pytest.raises(ConfigError, match=r"^sources\.cells\.columns: unknown canonical column\(s\) easting"):
        config_from_dict({"sources": {"cells": {"columns": {"easting": "e"}}}})
    cfg = config_from_dict({"sources": {"cells": {"crs": "EPSG:32629", "columns": {"easting": "e", "northing": "n"}}}})
    assert cfg.sources.cells.projected and not cfg.sources.mdt.projected


_CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted([*_CONF.glob("*.yaml"), *_CONF.glob("examples/*.yaml")]), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    # conf/whatif holds change files, not pipeline configs
    cfg = load_config(path)
    assert cfg.run.name


def test_readme_source_examples_load():
    # every YAML block of the README that sets `sources` is a config a user can copy
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "sources:" in b]
    blocks = [b for b in blocks if isinstance(b, dict) and "sources" in b]
    assert blocks
    for block in blocks:
        cfg = config_from_dict(block)
        assert cfg.sources.mdt.columns or cfg.sources.traffic.columns or cfg.sources.cells.columns


def test_plan_points_or_ues_alone_replace_the_default_km_budget():
    # `plan: {n_points: 20}` failed with "set exactly one of ..." because budget_km has a default
    cfg = config_from_dict({"plan": {"n_points": 20}})
    assert (cfg.plan.budget_km, cfg.plan.n_points) == (None, 20)
    assert config_from_dict({"plan": {"n_ues": 5}}).plan.budget_km is None
    assert config_from_dict({}).plan.budget_km == 20.0
    with pytest.raises(ConfigError, match=r"plan\.budget_km: set exactly one"):
        config_from_dict({"plan": {"n_points": 20, "budget_km": 3}})


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf" / "examples").glob("*.yaml")))
def test_example_configs_load_and_name_files_that_exist(name, monkeypatch):
    # Each shipped example is a config a user runs from the repo root as its header says: it validates,
    # and every input file it names is there whenever the shared data is (a renamed data file or key
    # would otherwise surface only when someone runs the example).
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "conf" / "examples" / name)
    named = [cfg.scenario.sites_csv] + [getattr(cfg.sources, kind).path for kind in ("mdt", "traffic", "cells")]
    local = [p for p in named if p and "://" not in p]
    if any("shared/data" in p for p in local) and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("shared data absent")
    for path in local:
        assert glob.glob(path), f"{name}: {path} matches no file"


def test_windows_take_the_sources_time_zone_unless_set():
    # a network's "morning" is its users' morning: the MDT source's zone (the traffic source's without MDT) when
    # ingest.windows.timezone is not set; an unknown zone is one line naming the key
    mdt = {"path": "m.csv", "timezone": "Asia/Shanghai"}
    assert config_from_dict({"sources": {"mdt": mdt}}).ingest.windows.timezone == "Asia/Shanghai"
    assert config_from_dict({"sources": {"traffic": {"path": "t.csv", "timezone": "Europe/Dublin"}}}).ingest.windows.timezone == "Europe/Dublin"
    set_utc = config_from_dict({"sources": {"mdt": mdt}, "ingest": {"windows": {"timezone": "UTC", "kind": "part_of_day"}}})
    assert set_utc.ingest.windows.timezone == "UTC" and set_utc.ingest.windows.kind == "part_of_day"
    assert config_from_dict({"sources": {"mdt": {"timezone": "Asia/Shanghai"}}}).ingest.windows.timezone == "UTC"  # no path
    assert config_from_dict({}).ingest.windows.timezone == "UTC"
    with pytest.raises(ConfigError, match=r"^ingest\.windows\.timezone: unknown time zone \(an IANA name"):
        config_from_dict({"ingest": {"windows": {"timezone": "Europe/Dubln"}}})
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.timezone: unknown time zone"):
        config_from_dict({"sources": {"mdt": {"timezone": "CET+1"}}})


def test_unquoted_yaml_dates_load_as_their_iso_text(tmp_path):
    # YAML reads 2022-12-06 as a date object; the override step's copy of the file crashed on it
    from cellsynth.config import load_config

    (tmp_path / "c.yaml").write_text("ingest: {period_start: 2022-12-01, period_end: 2022-12-31}\n"
                                     "sources: {mdt: {timestamp_date: 2022-12-06}}\n")
    cfg = load_config(tmp_path / "c.yaml", overrides=["ingest.n_cell_shards=4"])
    assert (cfg.ingest.period_start, cfg.sources.mdt.timestamp_date, cfg.ingest.n_cell_shards) == ("2022-12-01", "2022-12-06", 4)
