"""5G NR data read with LTE's RSRP range: the cell-edge reports it rejects are named in a warning."""

from __future__ import annotations

import pandas as pd

from tests.ingest.test_long_layout import _ingest, _reports


def test_reports_rejected_inside_nrs_rsrp_range_get_a_warning_naming_the_key(tmp_path, spark, capsys):
    _reports(tmp_path)
    wide = pd.read_csv(tmp_path / "wide.csv").astype({"serving_rsrp_dbm": float})
    wide.loc[:4, "serving_rsrp_dbm"] = [-141, -150, -156, -143.5, -35]  # NR reports these (TS 38.133)
    wide.loc[5:6, "serving_rsrp_dbm"] = [-200, 10]  # nothing reports these
    wide = wide.astype({"serving_rsrp_dbm": object})
    wide.loc[7, "serving_rsrp_dbm"] = "abc"  # a bad_number: read as text by the warning's count, never cast
    wide.to_csv(tmp_path / "wide.csv", index=False)
    result, _ = _ingest(tmp_path, spark, "nr", {"path": str(tmp_path / "wide.csv")})
    assert result.metrics["rejects.rsrp_out_of_range"] == 7.0 and result.metrics["rejects.bad_number"] == 1.0
    err = " ".join(capsys.readouterr().err.split())
    assert ("warning: ingest: 5 MDT reports were rejected as rsrp_out_of_range with an RSRP inside 5G NR's reporting "
            "range (-156 to -31 dBm, TS 38.133); for NR data set ingest.rsrp_range_dbm: [-156, -31]") in err
