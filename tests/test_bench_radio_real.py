"""bench/radio_real.py: its metrics, splits and dataset YAMLs give hand-computed answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cellsynth.errors import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "radio_real.py"


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("bench_radio_real", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_radio_real"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_scores_match_hand_computed_values(rr):
    # errors -2, -0.5, 0.5, 2 with std 1: PIT = 0.023, 0.309, 0.691, 0.977. Below p the share is
    # 0.25 for p = 0.05..0.30 (6 levels), 0.5 for 0.35..0.65 (7), 0.75 for 0.70..0.95 (6):
    # sum |share - p| = 0.55 + 0.60 + 0.55 = 1.70 over 19 levels.
    y = np.zeros(4)
    mean = np.array([2.0, 0.5, -0.5, -2.0])
    s = rr.weighted_scores(y, mean, np.ones(4))
    assert s["ce"] == pytest.approx(1.70 / 19)
    assert s["mae_db"] == pytest.approx(1.25)
    assert s["rmse_db"] == pytest.approx(np.sqrt(2.125))
    assert s["cov50"] == pytest.approx(0.5)  # |e| <= 0.674: the two 0.5s
    assert s["cov90"] == pytest.approx(0.5)  # |e| <= 1.645: still only those two
    w = rr.weighted_scores(y, mean, np.ones(4), np.array([1.0, 1.0, 1.0, 5.0]))
    assert w["mae_db"] == pytest.approx((2 + 0.5 + 0.5 + 10) / 8)
    assert w["cov90"] == pytest.approx(2 / 8)
    # wide intervals: every row inside both; PIT all in (0.3, 0.7)
    wide = rr.weighted_scores(y, mean, np.full(4, 10.0))
    assert wide["cov50"] == pytest.approx(1.0) and wide["cov90"] == pytest.approx(1.0)


def test_cell_bootstrap_intervals_resample_whole_cells(rr):
    rng = np.random.default_rng(1)
    # 40 cells of 30 test rows; "good" errs N(0, 1) with std 1, "bad" N(0, 3) with std 1 and a
    # 2 dB bias in the last 20 cells
    rows = [{"y_te": rng.normal(0, 1, 30), "w_te": np.ones(30)} for _ in range(40)]
    good = {"mean": [np.zeros(30)] * 40, "std": [np.ones(30)] * 40}
    bad = {"mean": [np.zeros(30)] * 20 + [np.full(30, 2.0)] * 20, "std": [np.ones(30)] * 40}
    preds = {"knn": bad, "rf": bad, "gp": bad, "ours": good}
    out = rr.cell_bootstrap(rows, preds, best="knn", seed=0)
    y = np.concatenate([r["y_te"] for r in rows])
    for name, p in (("ours", good), ("gp", bad)):
        point = rr.weighted_scores(y, np.concatenate(p["mean"]), np.concatenate(p["std"]))
        for k in ("mae_db", "ce", "cov50", "cov90"):
            lo, hi = out["models"][name][k]
            assert lo <= point[k] <= hi, (name, k)
    lo, hi = out["models"]["ours"]["cov90"]
    assert 0.85 < lo < hi < 0.95 and hi - lo < 0.05
    # which cells are biased moves the bad model's MAE a lot between resamples; paired, ours stays below
    assert np.diff(out["models"]["gp"]["mae_db"])[0] > np.diff(out["models"]["ours"]["mae_db"])[0]
    assert out["ours_minus_best_mae_db"][1] < 0 and out["ours_minus_gp_ce"][1] < 0
    # the same seed: the same intervals; sums per cell equal the pooled scores' inputs
    assert out == rr.cell_bootstrap(rows, preds, best="knn", seed=0)
    sums = rr.cell_sums(rows, good).sum(axis=0)
    assert rr.scores_of_sums(sums)["mae_db"] == pytest.approx(np.mean(np.abs(y)))


def test_block_split_holds_out_35_percent_of_occupied_blocks(rr):
    rng = np.random.default_rng(0)
    bx, by = np.meshgrid(np.arange(5), np.arange(4))  # 20 occupied 200 m blocks
    centres = np.column_stack([bx.ravel(), by.ravel()]) * 200.0 + 100.0
    xy = np.repeat(centres, 3, axis=0) + rng.uniform(-90, 90, (60, 2))
    test = rr.block_split(xy[:, 0], xy[:, 1], seed=3)
    per_block = test.reshape(20, 3)
    assert (per_block.all(axis=1) | ~per_block.any(axis=1)).all()  # a block is wholly in or out
    assert per_block[:, 0].sum() == 7  # round(0.35 x 20)
    # the same coordinates in two frames (groups) are different blocks: 40 blocks, 14 held out
    two = rr.block_split(np.tile(xy[:, 0], 2), np.tile(xy[:, 1], 2), np.repeat(["a", "b"], 60), seed=3)
    assert two.reshape(40, 3)[:, 0].sum() == 14


def test_random_split_is_per_cell(rr):
    cells = np.repeat(["a", "b"], [20, 7])
    test = rr.random_split(cells, np.arange(27), seed=1)
    assert test[:20].sum() == 7 and test[20:].sum() == 2  # round(0.35 x 20), round(0.35 x 7)


def test_far_probes_are_3km_beyond_every_row(rr):
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 300.0]])
    d = cdist(rr.far_probes(xy), xy).min(axis=1)
    assert d.min() >= 3000.0 - 1e-6 and d.min() == pytest.approx(3000.0, abs=60.0)


def test_dataset_yaml_with_a_bad_key_fails_with_one_line_naming_it(rr, tmp_path):
    good = (BENCH.parent / "datasets" / "ucc-5g.yaml").read_text()
    bad = tmp_path / "mine.yaml"
    bad.write_text(good.replace("min_rows_per_cell: 50", "min_rows_per_cel: 50"))
    with pytest.raises(ConfigError) as err:
        rr.load_spec(str(bad))
    assert str(err.value) == "min_rows_per_cel: unknown key"
    nested = tmp_path / "nested.yaml"
    nested.write_text(good.replace("  format: csv", "  formatt: csv"))
    with pytest.raises(ConfigError, match=r"^source\.formatt: unknown key$"):
        rr.load_spec(str(nested))


def test_an_operators_yaml_names_its_data_from_its_own_folder(rr, tmp_path, monkeypatch):
    # `--dataset /data/op/mine.yaml` with `path: drives/*.csv` beside it: the data was looked up from the
    # working directory and then the repo root only, so the operator's relative path failed
    good = (BENCH.parent / "datasets" / "ucc-5g.yaml").read_text()
    (tmp_path / "op" / "drives").mkdir(parents=True)
    (tmp_path / "op" / "drives" / "a.csv").write_text("Latitude,Longitude,RSRP\n")
    mine = tmp_path / "op" / "mine.yaml"
    mine.write_text(good.replace("../shared/data/ucc-5g/5G-production-dataset.zip", "drives/*.csv"))
    monkeypatch.chdir(tmp_path)
    spec, _ = rr.load_spec(str(mine))
    assert spec.source.path == str(tmp_path / "op" / "drives/*.csv")
    # a path that resolves from the working directory, or an absolute one, stays as written
    (tmp_path / "drives").mkdir()
    (tmp_path / "drives" / "b.csv").write_text("x\n")
    assert rr.load_spec(str(mine))[0].source.path == "drives/*.csv"
    shipped, _ = rr.load_spec("ucc-5g")
    assert shipped.source.path == "../shared/data/ucc-5g/5G-production-dataset.zip"


def test_every_shipped_dataset_yaml_validates(rr):
    for path in sorted((BENCH.parent / "datasets").glob("*.yaml")):
        spec, digest = rr.load_spec(str(path))
        assert spec.name == path.stem and len(digest) == 12


def test_readme_table_is_rendered_from_the_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_radio_table", BENCH.parent / "radio_table.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    m = {"mae_db": 3.0, "median_cell_mae_db": 2.5, "rmse_db": 4.0, "ce": 0.02, "cov50": 0.5, "cov90": 0.9}
    res = {"dataset": "toy", "description": "d", "counts": {"rows": 1234, "cells": 5}, "weighting": "w",
           "machine": {"cores": 2}, "commit": "abc", "wall_s": 120.0,
           "baselines": {"description": {"knn": "K", "rf": "R", "gp": "G"}, "rows": "rows"},
           "splits_definition": {"random": "a", "blocks": "b"}, "ce_formula": "CE", "coverage": "c", "epistemic": "e",
           "splits": {"random": {"n_cells": 5, "n_test": 100, "models": {
               "ours": {**m, "epistemic_train_db": 1.0, "epistemic_3km_db": 20.0}, "knn": {**m, "mae_db": 3.5},
               "rf": {**m, "mae_db": 3.1, "median_cell_mae_db": 2.0}, "gp": {**m, "mae_db": 3.2}}}}}
    path = tmp_path / "radio_real_toy.json"
    path.write_text(__import__("json").dumps(res))
    text = rt.render([path])
    assert "| ours | **3.00** | 2.50 | 4.00 | 0.020 | 0.50 | 0.90 | 1.0 / 20.0 |" in text
    assert "| random forest | 3.10 | **2.00** |" in text
    assert "Baselines: kNN: K." in text
    assert "Cell bootstrap" not in text  # a result without intervals renders none
    res["splits"]["random"]["bootstrap"] = {
        "draws": 2000, "models": {"ours": {"cov50": [0.45, 0.55], "cov90": [0.86, 0.93], "ce": [0.01, 0.03]}},
        "ours_minus_best_mae_db": [-0.3, -0.01], "ours_minus_gp_ce": [-0.02, 0.004]}
    path.write_text(__import__("json").dumps(res))
    assert ("Cell bootstrap, 95% intervals (2,000 resamples of the cells, each with all its test rows; report only): "
            "random: ours cov50 [0.45, 0.55], cov90 [0.86, 0.93], CE [0.010, 0.030]; ours minus the best baseline's MAE "
            "[-0.30, -0.01] dB, ours minus the GP's CE [-0.020, 0.004].") in rt.render([path])
    readme = "intro\n" + rt.BEGIN + "\nold\n" + rt.END + "\noutro\n"
    assert rt.replace_block(readme, "new\n") == "intro\n" + rt.BEGIN + "\nnew\n" + rt.END + "\noutro\n"


def test_seeds_reading_means_and_tallies(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_radio_table", BENCH.parent / "radio_table.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    json = __import__("json")

    def run(seed, ours_mae, ours_cov90):
        m = {"mae_db": 3.2, "median_cell_mae_db": 3.0, "ce": 0.02, "cov50": 0.5, "cov90": 0.9}
        return {"dataset": "toy", "seed": seed, "splits": {"random": {"models": {
            "ours": {**m, "mae_db": ours_mae, "median_cell_mae_db": 2.0, "ce": 0.01, "cov90": ours_cov90},
            "knn": {**m, "mae_db": 3.5}, "rf": m, "gp": m}}}}

    paths = []
    for seed, mae, cov90 in ((42, 3.0, 0.90), (43, 3.4, 0.85)):
        paths.append(tmp_path / f"toy_seed{seed}.json")
        paths[-1].write_text(json.dumps(run(seed, mae, cov90)))
    # one dataset with one run only: no second reading
    assert rt.render_seeds(paths[:1], []) == ""
    text = rt.render_seeds(paths[:1], paths[1:])
    assert "outer split seeds 42, 43" in text
    # ours' mean MAE (3.0 + 3.4) / 2 = 3.20 ties RF's 3.20: both bold; cov90 0.875 shown as 0.88 (rounded mean)
    assert "| random 65/35 per cell | ours | **3.20** | **2.00** | 0.010 | 0.50 | 0.88 |" in text
    assert "MAE 1/2, median MAE 2/2, CE <= GP 2/2, cov50 2/2, cov90 1/2 |" in text
    assert "| random forest | **3.20** | 3.00 |" in text
    # runs of one model version: no model-code line; a seed rerun on another version: each seed's commit named
    assert "Model code of ours by seed" not in text
    for p, commit in zip(paths, ("a" * 40, "b" * 40)):
        p.write_text(json.dumps({**json.loads(p.read_text()), "radio_model_commit": commit}))
    text = rt.render_seeds(paths[:1], paths[1:])
    assert "Model code of ours by seed: seed 42 at `aaaaaaaaaa`; seed 43 at `bbbbbbbbbb`." in text


def test_thin_reading_lines_and_the_cap_never_writes_the_headline_file(tmp_path, rr, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_radio_table", BENCH.parent / "radio_table.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    json = __import__("json")
    m = {"mae_db": 4.2, "median_cell_mae_db": 3.8, "ce": 0.03, "cov50": 0.5, "cov90": 0.9}
    run = {"dataset": "toy", "row_cap_per_cell": 15, "splits": {"random": {"models": {
        "ours": {**m, "mae_db": 4.0, "median_cell_mae_db": 3.9, "ce": 0.02, "cov90": 0.84},
        "knn": {**m, "mae_db": 4.5}, "rf": m, "gp": {**m, "median_cell_mae_db": 3.7}}}}}
    path = tmp_path / "toy_cap15.json"
    path.write_text(json.dumps(run))
    assert rt.render_thin([]) == ""
    text = rt.render_thin([path])
    assert ("| toy | 15 | random 65/35 per cell | 4.00 / 4.20 | 3.90 / 3.70 | 0.020 / 0.030 | 0.50 | 0.84 | "
            "3/5: median MAE, cov90 missed |") in text
    # --max-train-rows without --out goes to radio_real_thin/, never over radio_real_<name>.json
    import argparse

    seen = {}
    monkeypatch.setattr(rr, "row_cap", lambda: 1500)
    monkeypatch.setattr(rr, "load_spec", lambda name: (argparse.Namespace(name="toy", description="", weight=None), "h"))
    monkeypatch.setattr(rr, "load_dataset", lambda spec: type("D", (), {"attrs": {"counts": {}}})())
    monkeypatch.setattr(rr, "evaluate_split", lambda *a, **kw: (seen.setdefault("cap", kw["row_cap"]), {})[1])
    monkeypatch.setattr(rr, "split_mask", lambda *a, **kw: None)
    monkeypatch.setattr(rr, "RESULTS_THIN", tmp_path / "thin")
    rr.run_dataset("toy", out=None, splits=("random",), max_cells=0, seed=42, cells_per_shard=80, n_samples=8,
                   baselines=rr.BaselineSettings(), max_train_rows=15)
    assert seen["cap"] == 15 and json.loads((tmp_path / "thin" / "toy_cap15.json").read_text())["thin"] is True


UAV_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uav-lte-a2g-ukm" / "raw_dataset.zip"


@pytest.mark.skipif(not UAV_ZIP.is_file(), reason="UAV flights not in ../shared/data")
def test_uav_flights_load_as_one_cell_per_flight_and_pci(rr):
    """The zip's per-flight CSVs through ingest's adapters: the flight (the member's file name, i.e. its height) is
    part of the cell, the footer lines and the rows of other event groups (no pcell RSRP or no fix) drop out."""
    spec, _ = rr.load_spec("uav-lte")
    df = rr.load_dataset(spec)
    c = df.attrs["counts"]
    assert c["raw_rows"] == 175_229  # the data README: 175,287 lines read, less 58 footer lines
    assert c["duplicates"] == 10_294 and c["rows"] == 53_224 and c["cells"] == 142
    assert c["raw_rows"] == c["missing_fields"] + c["duplicates"] + c["rows_in_small_cells"] + c["rows"]
    flights = df["cell_id"].str.split(":").str[0]
    assert flights.str.fullmatch(r"\d+m(-1)?\.csv").all() and flights.nunique() >= 25
    assert df["rsrp_dbm"].between(-98, -56).all()  # the data README's observed pcell range
    # one campus: 1.6 km x 0.9 km
    assert np.ptp(df["x_m"]) < 1_200 and np.ptp(df["y_m"]) < 1_800


def test_a_projected_crs_dataset_loads_at_the_same_positions_as_latlon(rr, tmp_path):
    # an operator's export in UTM metres (`crs` + easting/northing, as ingest takes it) crashed the bench with
    # KeyError 'latitude'; it must give the positions the same rows give in WGS84
    from pyproj import Transformer

    rng = np.random.default_rng(4)
    lat = 41.88 + rng.uniform(0, 0.02, 120)
    lon = -87.63 + rng.uniform(0, 0.02, 120)
    cell = np.repeat(["7", "9"], 60)
    rsrp = rng.uniform(-110, -70, 120).round(1)
    east, north = Transformer.from_crs("EPSG:4326", "EPSG:26916", always_xy=True).transform(lon, lat)
    rows = "\n".join(f"{a},{b},{e},{n},{c},{r}" for a, b, e, n, c, r in zip(lat, lon, east, north, cell, rsrp))
    (tmp_path / "d.csv").write_text("lat,lon,east,north,cid,rsrp\n" + rows + "\n")
    common = "cell_id: [cid]\nmin_rows_per_cell: 10\n"
    (tmp_path / "ll.yaml").write_text("name: ll\nsource: {path: d.csv, format: csv, neighbour_layout: none, columns: "
                                      "{latitude: lat, longitude: lon, rsrp_dbm: rsrp}}\n" + common)
    (tmp_path / "utm.yaml").write_text("name: utm\nsource: {path: d.csv, format: csv, crs: 'EPSG:26916', neighbour_layout: "
                                       "none, columns: {easting: east, northing: north, rsrp_dbm: rsrp}}\n" + common)
    ll = rr.load_dataset(rr.load_spec(str(tmp_path / "ll.yaml"))[0])
    utm = rr.load_dataset(rr.load_spec(str(tmp_path / "utm.yaml"))[0])
    assert len(ll) == len(utm) == 120
    np.testing.assert_allclose(utm[["x_m", "y_m"]].to_numpy(), ll[["x_m", "y_m"]].to_numpy(), atol=0.01)
    np.testing.assert_array_equal(utm["rsrp_dbm"].to_numpy(), ll["rsrp_dbm"].to_numpy())


def test_a_dataset_with_no_cell_to_score_is_one_line_saying_where_the_rows_went(rr, tmp_path):
    # a traceback from np.concatenate on an empty split before
    rows = "\n".join(f"{51.9 + i * 1e-4},{-8.4 + i * 1e-4},{i % 3},{-90 - i % 7}" for i in range(30))
    (tmp_path / "d.csv").write_text("lat,lon,cid,rsrp\n" + rows + "\n")
    (tmp_path / "d.yaml").write_text("name: d\nsource: {path: d.csv, format: csv, neighbour_layout: none, columns: "
                                     "{latitude: lat, longitude: lon, rsrp_dbm: rsrp}}\ncell_id: [cid]\n")
    with pytest.raises(ConfigError, match=r"^min_rows_per_cell: no cell has >= 50 rows \(the largest has 10; raw_rows 30, "):
        rr.load_dataset(rr.load_spec(str(tmp_path / "d.yaml"))[0])
    (tmp_path / "d.yaml").write_text((tmp_path / "d.yaml").read_text() + "min_rows_per_cell: 5\n")
    spec, digest = rr.load_spec(str(tmp_path / "d.yaml"))
    df = rr.load_dataset(spec)
    with pytest.raises(ConfigError, match=r"^d/random: no cell has >= 10 training and >= 1 held-out rows on this split \(3 cells, 30 rows\)$"):
        rr.evaluate_split(df, rr.split_mask(df, "random", seed=42), name="d", split="random", spec_hash=digest, seed=42,
                          max_cells=0, cells_per_shard=80, n_samples=0, baselines=rr.BaselineSettings(), row_cap=1500)


def _toy_csv(tmp_path, lat, lon, name="d"):
    rng = np.random.default_rng(5)
    cell = np.repeat(["1", "2"], len(lat) // 2)
    rows = "\n".join(f"{a},{b},{c},{r}" for a, b, c, r in zip(lat, lon, cell, rng.uniform(-110, -70, len(lat)).round()))
    (tmp_path / f"{name}.csv").write_text("lat,lon,cid,rsrp\n" + rows + "\n")
    (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nsource: {{path: {name}.csv, format: csv, neighbour_layout: none, "
                                           "columns: {latitude: lat, longitude: lon, rsrp_dbm: rsrp}}\ncell_id: [cid]\n"
                                           "min_rows_per_cell: 20\n")
    return str(tmp_path / f"{name}.yaml")


def test_positions_off_the_globe_are_dropped_and_counted(rr, tmp_path):
    # one corrupt GPS fix (lat 999) made the local frame's x infinite and the kNN baseline crash
    # ("data must be finite"); projected metres under latitude / longitude fail with a hint
    rng = np.random.default_rng(6)
    lat, lon = 51.89 + rng.uniform(0, 0.01, 100), -8.49 + rng.uniform(0, 0.01, 100)
    lat[[3, 50, 77]] = 999.0
    df = rr.load_dataset(rr.load_spec(_toy_csv(tmp_path, lat, lon))[0])
    assert df.attrs["counts"]["bad_position"] == 3 and len(df) == 97
    assert np.isfinite(df[["x_m", "y_m"]].to_numpy()).all() and np.ptp(df["x_m"].to_numpy()) < 2000.0
    east, north = 500_000 + rng.uniform(0, 900, 100), 5_750_000 + rng.uniform(0, 900, 100)
    with pytest.raises(ConfigError, match=r"bad_position 100.*projected coordinates\? map easting / northing and set source\.crs$"):
        rr.load_dataset(rr.load_spec(_toy_csv(tmp_path, north, east, name="utm"))[0])


def test_a_split_the_set_cannot_be_scored_on_is_skipped_and_recorded(rr, tmp_path, monkeypatch):
    # every row in one 200 m block: the blocks split has no training rows; the random split still runs
    rng = np.random.default_rng(7)
    # (a few metres off the frame's rounded origin, so no block edge runs through them)
    path = _toy_csv(tmp_path, 51.89003 + rng.uniform(0, 1e-6, 100), -8.49003 + rng.uniform(0, 1e-6, 100))
    monkeypatch.setattr(rr, "evaluate_split", lambda df, test, **kw: {"models": {}, "n_cells": 2, "rows": int((~test).sum())})
    out = tmp_path / "out.json"
    res = rr.run_dataset(path, out=str(out), splits=("random", "blocks"), max_cells=0, seed=42, cells_per_shard=80,
                         n_samples=8, baselines=rr.BaselineSettings())
    written = __import__("json").loads(out.read_text())
    assert written["splits"]["random"]["rows"] == res["splits"]["random"]["rows"] == 64  # 50 - round(0.35 x 50) per cell
    assert written["splits"]["blocks"] == {"skipped": "no cell has >= 10 training and >= 1 held-out rows on this split "
                                                      "(2 cells, 100 rows)"}
    spec = importlib.util.spec_from_file_location("bench_radio_table", BENCH.parent / "radio_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert "| 200 m blocks, 35% held out: skipped (no cell has >= 10 training" in "\n".join(table.dataset_block(
        {**written, "splits": {"blocks": written["splits"]["blocks"]}}))
    with pytest.raises(ConfigError, match=r"^d: no split can be scored: blocks: no cell has"):
        rr.run_dataset(path, out=str(out), splits=("blocks", "blocks"), max_cells=0, seed=42, cells_per_shard=80,
                       n_samples=8, baselines=rr.BaselineSettings())


def test_a_long_layout_dataset_scores_only_its_serving_rows(rr, tmp_path):
    # one row per measured cell: without serving_rows the neighbours' RSRP would train the serving model
    rng = np.random.default_rng(5)
    lat, lon = 51.9 + rng.uniform(0, 0.01, 80), -8.47 + rng.uniform(0, 0.01, 80)
    srv = rng.uniform(-100, -70, 80).round(1)
    lines = [f"{i},{a},{b},S,{i % 2},{r}" for i, (a, b, r) in enumerate(zip(lat, lon, srv))]
    lines += [f"{i},{a},{b},N,{2 + i % 3},{r - 20}" for i, (a, b, r) in enumerate(zip(lat, lon, srv))]
    (tmp_path / "d.csv").write_text("t,lat,lon,type,cid,rsrp\n" + "\n".join(lines) + "\n")
    (tmp_path / "d.yaml").write_text(
        "name: d\nsource: {path: d.csv, format: csv, neighbour_layout: long, serving_rows: {column: type, in: [S]}, "
        "columns: {latitude: lat, longitude: lon, rsrp_dbm: rsrp}}\ncell_id: [cid]\nmin_rows_per_cell: 10\n")
    df = rr.load_dataset(rr.load_spec(str(tmp_path / "d.yaml"))[0])
    assert len(df) == 80 and set(df["cell_id"]) == {"0", "1"}
    np.testing.assert_allclose(np.sort(df["rsrp_dbm"].to_numpy()), np.sort(srv))
