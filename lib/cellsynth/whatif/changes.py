"""The what-if change file: validated edits to the cell layout (add, move, re-point, remove).

```yaml
name: north_infill                 # the scenario tag the rows are written under
changes:
  - {kind: add_cell, cell_id: NEW_1, x_m: 1200, y_m: -300, azimuth_deg: 90, height_m: 25,
     tx_power_dbm: 46, freq_mhz: 1800}          # or lat / lon instead of x_m / y_m
  - {kind: move_site, site_id: S00003, x_m: 900, y_m: 40}
  - {kind: set_cell, cell_id: S00001_2, azimuth_deg: 150, downtilt_deg: 8, tx_power_dbm: 43}
  - {kind: remove_cell, cell_id: S00002_3}
```

Field checks (types, ranges, tilt within [-90, 90]) are pydantic's; checks against the network
(unknown cell or site, a site outside the area, a duplicate new id) are `validate_against`'s.
Every problem is one line naming the entry: `changes[2] (remove_cell S9): unknown cell_id 'S9'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cellsynth.errors import ConfigError

_Az = Annotated[float, Field(ge=0.0, lt=360.0)]
_Tilt = Annotated[float, Field(ge=-90.0, le=90.0)]


def _id_text(value):
    """A cell or site id written as a YAML number (ECGIs, eNB ids) as the lake writes it: `1025` and
    `1025.0` are '1025' (ingest's rule for ids written as whole floats); anything else as given."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return value


_Id = Annotated[str, BeforeValidator(_id_text), Field(min_length=1)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Placed(_Entry):
    x_m: float | None = None
    y_m: float | None = None
    lat: float | None = Field(None, ge=-90.0, le=90.0)
    lon: float | None = Field(None, ge=-180.0, le=180.0)

    @model_validator(mode="after")
    def _one_position(self):
        has_xy = self.x_m is not None and self.y_m is not None
        has_ll = self.lat is not None and self.lon is not None
        if has_xy == has_ll:
            raise ValueError("position: expected either x_m and y_m or lat and lon")
        return self


class AddCell(_Placed):
    kind: Literal["add_cell"]
    cell_id: _Id
    site_id: _Id | None = None
    azimuth_deg: _Az | None = None  # None: omni-directional
    height_m: float = Field(25.0, gt=0.0, le=300.0)
    tx_power_dbm: float = Field(46.0, ge=0.0, le=60.0)
    freq_mhz: float = Field(1800.0, gt=100.0, le=100_000.0)
    downtilt_deg: _Tilt = 6.0


class MoveSite(_Placed):
    kind: Literal["move_site"]
    site_id: _Id


class SetCell(_Entry):
    kind: Literal["set_cell"]
    cell_id: _Id
    azimuth_deg: _Az | None = None
    downtilt_deg: _Tilt | None = None
    tx_power_dbm: float | None = Field(None, ge=0.0, le=60.0)
    height_m: float | None = Field(None, gt=0.0, le=300.0)

    @model_validator(mode="after")
    def _something(self):
        if all(v is None for v in (self.azimuth_deg, self.downtilt_deg, self.tx_power_dbm, self.height_m)):
            raise ValueError("set_cell: expected at least one of azimuth_deg, downtilt_deg, tx_power_dbm, height_m")
        return self


class RemoveCell(_Entry):
    kind: Literal["remove_cell"]
    cell_id: _Id


Change = Annotated[AddCell | MoveSite | SetCell | RemoveCell, Field(discriminator="kind")]


class ChangeSet(BaseModel):
    """A named list of changes (the scenario tag is `name`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)
    changes: tuple[Change, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _not_baseline(self):
        if self.name == "baseline":
            raise ValueError("name: 'baseline' is reserved for the measured network")
        return self


def _label(k: int, entry) -> str:
    target = getattr(entry, "cell_id", None) or getattr(entry, "site_id", None) or "?"
    return f"changes[{k}] ({entry.kind} {target})"


def _raw_label(k: int, raw) -> str:
    if isinstance(raw, dict):
        target = raw.get("cell_id") or raw.get("site_id") or "?"
        return f"changes[{k}] ({raw.get('kind', '?')} {target})"
    return f"changes[{k}]"


def parse_changes(data: dict) -> ChangeSet:
    """Validate a raw mapping into a `ChangeSet`; one `ConfigError` line per problem, naming the entry."""
    if not isinstance(data, dict):
        raise ConfigError("changes: expected a mapping with 'name' and 'changes' at the top level")
    try:
        return ChangeSet.model_validate(data)
    except ValidationError as err:
        raw = data.get("changes") if isinstance(data.get("changes"), list) else []
        lines = []
        for item in err.errors():
            loc = list(item["loc"])
            if loc == ["changes"] and item["type"] == "too_short" and raw:
                continue  # pydantic's count of the entries that validated: each bad one has its own line
            msg = item["msg"].removeprefix("Value error, ")
            if loc[:1] == ["changes"] and len(loc) >= 2 and isinstance(loc[1], int):
                k = loc[1]
                field = ".".join(str(p) for p in loc[3:] if not isinstance(p, int))  # loc[2] is the kind tag
                head = _raw_label(k, raw[k] if k < len(raw) else None)
                got = item.get("input")
                shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f", got {got!r}"
                lines.append(f"{head}: {field + ': ' if field else ''}{msg}{shown}")
            else:
                key = ".".join(str(p) for p in loc) or "<root>"
                lines.append(f"changes file: {key}: {msg}")
        raise ConfigError(lines) from err


def load_changes(path: str | Path) -> ChangeSet:
    """Read and validate a change file (field checks only; see `validate_against`)."""
    from cellsynth.config import read_yaml_mapping

    return parse_changes(read_yaml_mapping(path, what="changes"))


def validate_against(changes: ChangeSet, cells: pd.DataFrame, *, area_bbox_m: tuple[float, float, float, float],
                     to_xy=None) -> None:
    """Check the changes against the network: known cells and sites, positions inside the area.

    Args:
        cells: the `cells` table (cell_id, site_id, x_m, y_m).
        area_bbox_m: (x_min, y_min, x_max, y_max) of the area in the lake frame.
        to_xy: callable (lat, lon) -> (x_m, y_m) for entries given in lat/lon.

    Raises:
        ConfigError: one line per problem, naming the entry.
    """
    known = set(cells["cell_id"].astype(str))
    sites = set(cells["site_id"].dropna().astype(str)) if "site_id" in cells else set()
    removed: set[str] = set()
    added: set[str] = set()
    problems = []
    x0, y0, x1, y1 = area_bbox_m
    for k, entry in enumerate(changes.changes):
        head = _label(k, entry)
        if isinstance(entry, AddCell | MoveSite):
            x, y = position_m(entry, to_xy)
            if not (x0 <= x <= x1 and y0 <= y <= y1):
                problems.append(f"{head}: site at ({x:.0f}, {y:.0f}) m is outside the area "
                                f"[{x0:.0f}, {x1:.0f}] x [{y0:.0f}, {y1:.0f}] m")
        if isinstance(entry, AddCell):
            if entry.cell_id in known or entry.cell_id in added:
                problems.append(f"{head}: cell_id {entry.cell_id!r} already exists")
            added.add(entry.cell_id)
        elif isinstance(entry, MoveSite):
            if entry.site_id not in sites:
                problems.append(f"{head}: unknown site_id {entry.site_id!r}")
        elif isinstance(entry, SetCell | RemoveCell):
            if entry.cell_id not in known and entry.cell_id not in added:
                problems.append(f"{head}: unknown cell_id {entry.cell_id!r}")
            elif entry.cell_id in removed:
                problems.append(f"{head}: cell_id {entry.cell_id!r} was removed by an earlier change")
            if isinstance(entry, RemoveCell):
                removed.add(entry.cell_id)
    if len(known | added) - len(removed) < 1:
        problems.append("changes: the changed network has no cells left")
    if problems:
        raise ConfigError(problems)


def position_m(entry: _Placed, to_xy=None) -> tuple[float, float]:
    if entry.x_m is not None:
        return float(entry.x_m), float(entry.y_m)
    if to_xy is None:
        raise ConfigError(f"{entry.kind}: lat/lon given but no frame to convert them")
    x, y = to_xy(np.array([entry.lat]), np.array([entry.lon]))
    return float(np.asarray(x)[0]), float(np.asarray(y)[0])


def apply_changes(cells: pd.DataFrame, changes: ChangeSet, *, to_xy=None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The changed network's cells table and {cell_id: what changed} for every touched cell.

    Removed cells leave the table; added cells join it with `downtilt_deg`; a moved site moves
    all its cells. `what` is one of added | moved | re-pointed | removed.
    """
    out = cells.copy()
    if "downtilt_deg" not in out:
        out["downtilt_deg"] = np.nan
    touched: dict[str, str] = {}
    for entry in changes.changes:
        if isinstance(entry, AddCell):
            x, y = position_m(entry, to_xy)
            row = {c: np.nan for c in out.columns}
            row.update(cell_id=entry.cell_id, site_id=entry.site_id or f"{entry.cell_id}_site", x_m=x, y_m=y,
                       azimuth_deg=np.nan if entry.azimuth_deg is None else entry.azimuth_deg,
                       height_m=entry.height_m, tx_power_dbm=entry.tx_power_dbm, freq_mhz=entry.freq_mhz,
                       downtilt_deg=entry.downtilt_deg)
            out = pd.concat([out, pd.DataFrame([row])], ignore_index=True)
            touched[entry.cell_id] = "added"
        elif isinstance(entry, MoveSite):
            x, y = position_m(entry, to_xy)
            sel = out["site_id"].astype(str) == entry.site_id
            out.loc[sel, "x_m"], out.loc[sel, "y_m"] = x, y
            for c in out.loc[sel, "cell_id"]:
                touched.setdefault(c, "moved")
        elif isinstance(entry, SetCell):
            sel = out["cell_id"] == entry.cell_id
            for col in ("azimuth_deg", "downtilt_deg", "tx_power_dbm", "height_m"):
                value = getattr(entry, col)
                if value is not None:
                    out.loc[sel, col] = value
            touched.setdefault(entry.cell_id, "re-pointed")
        elif isinstance(entry, RemoveCell):
            out = out[out["cell_id"] != entry.cell_id]
            touched[entry.cell_id] = "removed"
    return out.reset_index(drop=True), touched
