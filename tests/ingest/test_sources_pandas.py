"""`read_raw_pandas` reads a source like `read_raw` does (strings, trimmed, missing markers as
nulls, the file's name in FILE_COLUMN), and the "radio" kind maps its columns."""

from __future__ import annotations

import zipfile

import pytest

from cellsynth.config import config_from_dict
from cellsynth.errors import ConfigError
from cellsynth.ingest.sources import FILE_COLUMN, ResolvedSource, column_mapping, read_raw_pandas, resolve_source


def _source(tmp_path, path, **extra):
    cfg = config_from_dict({"scenario": {"enabled": False}, "run": {"data_dir": str(tmp_path / "data")},
                            "sources": {"mdt": {"path": str(path), "missing_values": ["", "-"], **extra}}})
    res = resolve_source(cfg, "mdt")
    return ResolvedSource("radio", res.files, res.cfg)


def test_zip_members_are_read_as_trimmed_strings_with_nulls(tmp_path):
    archive = tmp_path / "drives.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/Driving/a.csv", "Lat,Lon,RSRP,Mode\n51.9, -8.4 ,-91,LTE\n51.8,-8.5,-,5G\n")
        zf.writestr("set/Static/b.csv", "Lat,Lon,RSRP,Mode\n1,2,-70,LTE\n")
    src = _source(tmp_path, archive, archive_glob="*/Driving/*.csv",
                  columns={"latitude": "Lat", "longitude": "Lon", "rsrp_dbm": "RSRP"})
    df = read_raw_pandas(src)
    assert len(df) == 2  # the Static member is not read
    assert df["Lon"].tolist() == ["-8.4", "-8.5"]  # trimmed, still strings
    assert df["RSRP"].isna().tolist() == [False, True]  # "-" is a missing marker
    assert df[FILE_COLUMN].tolist() == ["a.csv", "a.csv"]
    mapping, pairs = column_mapping(src, list(df.columns))
    assert mapping == {"latitude": "Lat", "longitude": "Lon", "rsrp_dbm": "RSRP"} and pairs == []


def test_radio_kind_names_a_missing_required_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("Lat,Lon,RSRP\n1,2,-80\n")
    src = _source(tmp_path, path, columns={"latitude": "Lat", "longitude": "Lon"})
    with pytest.raises(ConfigError, match=r"sources\.radio\.columns: no raw column for required rsrp_dbm"):
        column_mapping(src, ["Lat", "Lon", "RSRP"])


def test_lines_with_the_wrong_field_count_are_dropped_and_counted(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('Lat,Lon,RSRP\n1,2,-80\n3,4\n5,6,-90,7,8\n"9,5",10,-95\n11,12,-99\n')
    src = _source(tmp_path, path, columns={"latitude": "Lat", "longitude": "Lon", "rsrp_dbm": "RSRP"})
    df = read_raw_pandas(src)
    assert df["RSRP"].tolist() == ["-80", "-95", "-99"]  # truncated and extra-field lines gone
    assert df["Lat"].tolist() == ["1", "9,5", "11"]  # a quoted separator is one field
    assert df.attrs["malformed_rows"] == 2


def test_a_gzip_export_reads_like_the_plain_file(tmp_path):
    # the malformed-line scan read the compressed bytes as text: its line numbers were garbage, so
    # pandas skipped good lines (or kept bad ones) of a .csv.gz
    import gzip

    text = 'Lat,Lon,RSRP\n1,2,-80\n3,4\n5,6,-90,7,8\n"9,5",10,-95\n11,12,-99\n'
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text.encode()))
    src = _source(tmp_path, tmp_path / "a.csv.gz", columns={"latitude": "Lat", "longitude": "Lon", "rsrp_dbm": "RSRP"})
    df = read_raw_pandas(src)
    assert df["RSRP"].tolist() == ["-80", "-95", "-99"] and df.attrs["malformed_rows"] == 2


def test_a_mapped_column_the_input_lacks_names_what_it_has_instead(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x\n")

    def problem(raw, columns):
        src = _source(tmp_path, path, columns={"latitude": "Lat", "longitude": "Lon", "rsrp_dbm": raw})
        with pytest.raises(ConfigError) as err:
            column_mapping(src, ["Lat", "Lon", *columns])
        return str(err.value)

    # a header that repeats the name: Spark reads the copies as RSRP7, RSRP9 (name + position)
    assert "'RSRP' not in the input (the header names it 2 times, read as RSRP7, RSRP9: map one" in problem(
        "RSRP", ["RSRP7", "RSRP9"])
    assert "did you mean 'RSRP (dBm)'?" in problem("rsrp (dbm)", ["RSRP (dBm)", "RSRQ"])  # another case
    assert "did you mean 'Serving_RSRP'?" in problem("ServingRSRP", ["Serving_RSRP", "SINR"])  # another separator
    assert "did you mean 'serving_rsrp_dbm'?" in problem("serving_rsrp_dB", ["serving_rsrp_dbm", "ue"])  # a typo
    assert "(have: Lat, Lon, SINR)" in problem("RSRP", ["SINR"])
