"""QIDO-RS: studies, series and instances matched in the store, as DICOM JSON.

Only archived instances are visible (they are the ones with an ``instances`` row;
quarantined files never get one). Matching is on what the store holds: UIDs, modality,
SOP class, series and instance numbers. The store holds no patient data by design, so
a filter on an attribute such as PatientName, PatientID, StudyDate or AccessionNumber
is refused (400) instead of silently ignored, which would return a wrong answer; those
attributes are still *returned*, read from one archived header per study or series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from triage.dicomweb.json_model import (
    SERIES_HEADER,
    STUDY_HEADER,
    attributes,
    header_attributes,
    read_header,
    resolve_keyword,
)
from triage.store.images import INSTANCE_ORDER

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
_CONTROL = ("limit", "offset", "includefield", "fuzzymatching")

# Matching keys per level: keyword -> SQL column (list or single-value match).
_MATCH: dict[str, dict[str, str]] = {
    "study": {"StudyInstanceUID": "s.study_uid"},
    "series": {"StudyInstanceUID": "s.study_uid",
               "SeriesInstanceUID": "instances.series_uid",
               "Modality": "instances.modality",
               "SeriesNumber": "instances.series_number"},
    "instance": {"StudyInstanceUID": "s.study_uid",
                 "SeriesInstanceUID": "instances.series_uid",
                 "SOPInstanceUID": "instances.sop_uid",
                 "SOPClassUID": "instances.sop_class_uid",
                 "Modality": "instances.modality",
                 "SeriesNumber": "instances.series_number",
                 "InstanceNumber": "instances.instance_number"},
}
_INTEGER = ("SeriesNumber", "InstanceNumber")


class QueryError(ValueError):
    """A QIDO-RS query this server cannot answer correctly (HTTP 400)."""


@dataclass
class Query:
    level: str  # study | series | instance
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    having: list[str] = field(default_factory=list)
    having_args: list[Any] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    limited: bool = False  # the client set limit (no Warning when it is reached)


def _values(raw: str) -> list[str]:
    return [v.strip() for v in raw.replace("\\", ",").split(",") if v.strip()]


def parse_query(level: str, params: Mapping[str, str] | list[tuple[str, str]],
                *, study_uid: str | None = None, series_uid: str | None = None) -> Query:
    """The query of a QIDO-RS request at ``level``, within the study/series of its path."""
    query = Query(level)
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    if study_uid is not None:
        _match(query, "s.study_uid", [study_uid])
    if series_uid is not None:
        _match(query, "instances.series_uid", [series_uid])
    for key, raw in pairs:
        if key in _CONTROL:
            if key in ("limit", "offset"):
                _paging(query, key, raw)
            continue  # includefield: every result carries a fixed set; fuzzymatching: exact
        keyword = resolve_keyword(key)
        if keyword is None:
            raise QueryError(f"unknown query parameter {key!r}")
        values = _values(raw)
        if not values:
            continue  # universal matching: as if the key were not there
        if keyword == "ModalitiesInStudy" and level == "study":
            marks = ", ".join("?" * len(values))
            query.having.append(
                f"SUM(CASE WHEN instances.modality IN ({marks}) THEN 1 ELSE 0 END) > 0")
            query.having_args += values
        elif keyword in _MATCH[level]:
            if any("*" in v or "?" in v for v in values):
                raise QueryError(f"wildcard matching of {keyword} is not supported")
            if keyword in _INTEGER:
                try:
                    values = [int(v) for v in values]  # type: ignore[misc]
                except ValueError:
                    raise QueryError(f"{keyword} must be an integer") from None
            _match(query, _MATCH[level][keyword], values)
        else:
            raise QueryError(
                f"filtering by {keyword} is not supported at the {level} level: this server "
                "keeps no patient data in its store; filter by UID or modality")
    return query


def _paging(query: Query, key: str, raw: str) -> None:
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{key} must be a non-negative integer") from None
    if value < 0:
        raise QueryError(f"{key} must be a non-negative integer")
    if key == "offset":
        query.offset = value
    elif 0 < value <= MAX_LIMIT:
        query.limit, query.limited = value, True
    else:  # more than this server returns at once: the Warning header says so
        query.limit = MAX_LIMIT


def _match(query: Query, column: str, values: list[Any]) -> None:
    query.where.append(f"{column} IN ({', '.join('?' * len(values))})")
    query.args += values


_FROM = ("FROM instances JOIN studies s ON s.id = instances.study_id "
         "WHERE instances.series_uid IS NOT NULL")


def run(db: sqlite_utils.Database, query: Query, home: Path,
        retrieve_url: Callable[..., str]) -> tuple[list[dict[str, Any]], bool]:
    """The matching results as DICOM JSON datasets, and whether there were more than
    ``limit`` of them. ``retrieve_url(study, series=None, instance=None)`` gives each
    result's WADO-RS URL."""
    where = "".join(f" AND {clause}" for clause in query.where)
    having = f" HAVING {' AND '.join(query.having)}" if query.having else ""
    args = [*query.args, *query.having_args, query.limit + 1, query.offset]
    if query.level == "study":
        sql = ("SELECT s.study_uid, COUNT(DISTINCT instances.series_uid) AS n_series, "
               "COUNT(*) AS n_instances, "
               "GROUP_CONCAT(DISTINCT instances.modality) AS modalities, "
               f"MIN(instances.path) AS path {_FROM}{where} GROUP BY s.id{having} "
               "ORDER BY s.id LIMIT ? OFFSET ?")
        build = _study
    elif query.level == "series":
        first = "MIN(instances.series_number)"
        sql = ("SELECT s.study_uid, instances.series_uid, "
               f"MIN(instances.modality) AS modality, {first} AS series_number, "
               "COUNT(*) AS n_instances, MIN(instances.path) AS path "
               f"{_FROM}{where} GROUP BY s.id, instances.series_uid{having} "
               f"ORDER BY s.id, {first} IS NULL, {first}, instances.series_uid "
               "LIMIT ? OFFSET ?")
        build = _series
    else:
        columns = ", ".join(f"instances.{c}" for c in (
            "series_uid", "sop_uid", "sop_class_uid", "modality", "series_number",
            "instance_number", "rows", "cols", "frames"))
        sql = (f"SELECT s.study_uid, {columns} {_FROM}{where} "
               f"ORDER BY s.id, {INSTANCE_ORDER} LIMIT ? OFFSET ?")
        build = _instance
    rows = list(db.query(sql, args))
    more = len(rows) > query.limit
    return [build(row, home, retrieve_url) for row in rows[: query.limit]], more


def _study(row: dict[str, Any], home: Path, url: Callable[..., str]) -> dict[str, Any]:
    header = read_header(home / row["path"])
    modalities = sorted(m for m in (row["modalities"] or "").split(",") if m)
    return {
        **header_attributes(header, STUDY_HEADER),
        **attributes({
            "StudyInstanceUID": row["study_uid"],
            "ModalitiesInStudy": modalities or None,
            "NumberOfStudyRelatedSeries": row["n_series"],
            "NumberOfStudyRelatedInstances": row["n_instances"],
            "RetrieveURL": url(row["study_uid"]),
        }),
    }


def _series(row: dict[str, Any], home: Path, url: Callable[..., str]) -> dict[str, Any]:
    header = read_header(home / row["path"])
    return {
        **header_attributes(header, STUDY_HEADER + SERIES_HEADER),
        **attributes({
            "StudyInstanceUID": row["study_uid"],
            "SeriesInstanceUID": row["series_uid"],
            "Modality": row["modality"],
            "SeriesNumber": row["series_number"],
            "NumberOfSeriesRelatedInstances": row["n_instances"],
            "RetrieveURL": url(row["study_uid"], row["series_uid"]),
        }),
    }


def _instance(row: dict[str, Any], home: Path, url: Callable[..., str]) -> dict[str, Any]:
    return attributes({
        "StudyInstanceUID": row["study_uid"],
        "SeriesInstanceUID": row["series_uid"],
        "SOPClassUID": row["sop_class_uid"],
        "SOPInstanceUID": row["sop_uid"],
        "Modality": row["modality"],
        "SeriesNumber": row["series_number"],
        "InstanceNumber": row["instance_number"],
        "Rows": row["rows"],
        "Columns": row["cols"],
        "NumberOfFrames": row["frames"] or None,
        "RetrieveURL": url(row["study_uid"], row["series_uid"], row["sop_uid"]),
    })
