"""Logged bandit data as files: an app's own log read against its spec, a simulator's written.

Formats, by suffix: ``.csv`` (a header line; a ranking row's candidates as JSON text in one
cell), ``.jsonl`` (one JSON object a line) and ``.parquet`` (pyarrow, in the ``train`` extra;
candidates a list column of ``{id, features}`` structs, or JSON text). The columns are named by
the spec (``policyloop/contract/spec.py``): its ``[data]`` table's action, reward, propensity and
candidates (ranking), and one column per context feature by its name: a number, or for a
categorical feature (the spec's ``[features.categorical]``) its value as text, which becomes
its block of columns as in serving. A ranking row's
candidates are ``[{"id": "item-7", "features": {"price": 9.9, ...}}, ...]``, every candidate
with every feature of ``[features] action``; the action is the chosen candidate's id. A fixed
action set's action is one of the spec's action ids.

Validation happens here, where data enters. A row is used only if its propensity is finite and
in (0, 1], its reward finite, every feature present and a finite number, and its action one of
the spec's actions or of the row's candidate ids. A bad row is dropped and reported with its
place (``FILE:LINE`` for CSV and JSONL, ``FILE row I``, from 0, for Parquet) and its field;
``ReadReport`` counts the rows read, used and dropped by field. An empty file, a missing
column, or a file without one usable row raises InvalidArgument with a one-line message.

>>> import tempfile
>>> from policyloop.contract.spec import parse_spec
>>> spec = parse_spec('name = "r"\\nkind = "actions"\\nactions = ["a", "b"]\\n'
...                   '[features]\\ncontext = ["x"]\\n')
>>> path = Path(tempfile.mkdtemp()) / "logs.csv"
>>> _ = path.write_text("x,action,reward,propensity\\n0.5,b,1,0.5\\n0.1,c,0,0.5\\n")
>>> data, report = read_logs(path, spec)
>>> data.action.tolist(), report.dropped
([1], {'action': 1})
>>> report.problems[0].split(": ", 1)[1]
"action: 'c' is not one of the spec's actions"
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policyloop.contract.errors import InvalidArgument, shown
from policyloop.contract.signature import Categorical
from policyloop.contract.spec import PolicySpec, parse_spec
from policyloop.simulators.logged import Env, LoggedBandit, collect_logs

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".jsonl", ".parquet")
SHOWN_PROBLEMS = 20  # bad rows logged one by one; the rest are counted


@dataclass
class ReadReport:
    """What reading one file found: every dropped row's one-line problem, counts by field."""

    path: Path
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"file": str(self.path), "rows_read": self.rows_read,
                "rows_used": self.rows_used, "rows_dropped": sum(self.dropped.values()),
                "dropped_by_field": dict(sorted(self.dropped.items()))}


class _BadRow(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def read_logs(path: Path, spec: PolicySpec) -> tuple[LoggedBandit, ReadReport]:
    """The usable rows of ``path`` as LoggedBandit (feature order: the spec's), and the report.

    Ranking rows with fewer candidates than the most any row has are padded with zeros and
    masked (``LoggedBandit.mask``). Raises InvalidArgument on an empty file, a missing column
    or no usable row."""
    columns, rows = _open(path)
    if not rows:
        raise InvalidArgument(f"{path}: no rows")
    data = spec.data
    context_fields = spec.features.fields("context")
    action_fields = spec.features.fields("action")
    required = [data.action, data.reward, data.propensity, *(n for n, _ in context_fields)]
    ranking = spec.policy_kind.per_action_features
    if ranking:
        required.append(data.candidates)
    for name in required:
        if name not in columns:
            shown = ", ".join(sorted(columns)[:8]) + (", ..." if len(columns) > 8 else "")
            raise InvalidArgument(f"{path}: column {name!r} is missing (columns: {shown})")
    report = ReadReport(path)
    index = {a: i for i, a in enumerate(spec.actions)}
    ctx: list[list[float]] = []
    cands: list[list[list[float]]] = []
    ids: list[list[str]] = []
    action: list[int] = []
    propensity: list[float] = []
    reward: list[float] = []
    for place, row in rows:
        report.rows_read += 1
        try:
            if "\0" in row:
                raise _BadRow("line", row["\0"])
            x = _encode(row, context_fields, "")
            r = _number(row.get(data.reward), data.reward)
            p = _number(row.get(data.propensity), data.propensity)
            if not 0 < p <= 1:
                raise _BadRow(data.propensity, f"{p!r} is not in (0, 1]")
            chosen = row.get(data.action)
            if chosen is None or chosen == "":
                raise _BadRow(data.action, "missing")
            if ranking:
                row_ids, feats = _candidates(row.get(data.candidates), data.candidates,
                                             action_fields)
                if str(chosen) not in row_ids:
                    raise _BadRow(data.action, f"{chosen!r} is not among the row's candidate "
                                  "ids")
                a = row_ids.index(str(chosen))
            else:
                if str(chosen) not in index:
                    raise _BadRow(data.action, f"{chosen!r} is not one of the spec's actions")
                a = index[str(chosen)]
        except _BadRow as bad:
            report.dropped[bad.field] = report.dropped.get(bad.field, 0) + 1
            report.problems.append(f"{place}: {bad}")
            if len(report.problems) <= SHOWN_PROBLEMS:
                log.warning("dropped %s: %s", place, bad)
            continue
        ctx.append(x)
        reward.append(r)
        propensity.append(p)
        action.append(a)
        if ranking:
            ids.append(row_ids)
            cands.append(feats)
    report.rows_used = len(action)
    if len(report.problems) > SHOWN_PROBLEMS:
        log.warning("dropped %d more rows", len(report.problems) - SHOWN_PROBLEMS)
    if not action:
        raise InvalidArgument(f"{path}: no usable rows: {report.rows_read} read, all dropped "
                              f"(by field: {report.summary()['dropped_by_field']}; first: "
                              f"{report.problems[0]})")
    n = len(action)
    action_features = mask = None
    if ranking:
        k = max(len(c) for c in cands)
        action_features = np.zeros((n, k, len(spec.features.action)), np.float32)
        full = np.zeros((n, k), bool)
        for i, c in enumerate(cands):
            action_features[i, :len(c)] = c
            full[i, :len(c)] = True
        mask = None if full.all() else full
    else:
        k = len(spec.actions)
    logged = LoggedBandit(
        np.array(ctx, np.float32).reshape(n, len(spec.features.context)), action_features,
        np.array(action, np.int64), np.array(propensity, np.float64),
        np.array(reward, np.float64), np.full((n, k), np.nan), features=spec.features,
        actions=spec.actions, action_ids=ids if ranking else None, mask=mask)
    return logged, report


def _open(path: Path) -> tuple[set[str], list[tuple[str, dict[str, Any]]]]:
    """The file's column names and its rows, each with its place for messages."""
    if path.suffix not in SUFFIXES:
        raise InvalidArgument(f"{path}: unknown format {path.suffix!r}; use one of "
                              f"{list(SUFFIXES)}")
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                columns = set(reader.fieldnames or ())
                rows = [(f"{path}:{reader.line_num}", row) for row in reader]
            return columns, rows
        if path.suffix == ".jsonl":
            return _jsonl(path)
        return _parquet(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidArgument(f"{path}: cannot read it: {exc}") from exc


def _jsonl(path: Path) -> tuple[set[str], list[tuple[str, dict[str, Any]]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    columns: set[str] = set()
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = {"\0": f"not JSON: {exc.msg}"}
            if not isinstance(row, dict):
                row = {"\0": f"not a JSON object: {line.strip()[:40]!r}"}
            columns.update(row)
            rows.append((f"{path}:{number}", row))
    return columns, rows


def _parquet(path: Path) -> tuple[set[str], list[tuple[str, dict[str, Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidArgument(f"{path}: reading Parquet needs pyarrow (the train extra: "
                              "uv sync --extra train, or pip install pyarrow)") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors share no base class but Exception
        raise InvalidArgument(f"{path}: not a Parquet file pyarrow can read: {exc}") from exc
    return set(table.column_names), [(f"{path} row {i}", row)
                                     for i, row in enumerate(table.to_pylist())]


def _number(value: Any, name: str) -> float:
    if value is None or value == "":
        raise _BadRow(name, "missing")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _BadRow(name, f"{value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise _BadRow(name, f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise _BadRow(name, f"{value!r} is not finite")
    return number


def _encode(values: dict[str, Any], fields: tuple[tuple[str, Categorical | None], ...],
            where: str) -> list[float]:
    """The model's columns from a row's (or a candidate's) values by feature name."""
    out: list[float] = []
    for name, cat in fields:
        if cat is None:
            out.append(_number(values.get(name), f"{where}{name}"))
            continue
        value = values.get(name)
        if value is None or value == "":
            raise _BadRow(f"{where}{name}", "missing")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise _BadRow(f"{where}{name}", f"{shown(value)} is not a category (a string)")
        block = [0.0] * len(cat.columns)
        column = cat.column(str(value))
        if column is not None:  # outside the vocabulary: no column, as serving does
            block[column] = 1.0
        out += block
    return out


def _candidates(value: Any, name: str, features: tuple[tuple[str, Categorical | None], ...]
                ) -> tuple[list[str], list[list[float]]]:
    """A ranking row's candidate ids and their features [k][Da], in the spec's order."""
    if value is None or value == "":
        raise _BadRow(name, "missing")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _BadRow(name, f"not JSON: {exc.msg}") from None
    if not isinstance(value, list) or not value:
        raise _BadRow(name, "a non-empty list of {\"id\", \"features\"} is required")
    ids: list[str] = []
    rows: list[list[float]] = []
    for j, cand in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(cand, dict) or "id" not in cand or "features" not in cand:
            raise _BadRow(where, "an object with \"id\" and \"features\" is required")
        feats = cand["features"]
        if isinstance(feats, list):  # a Parquet map column reads as (key, value) pairs
            feats = dict(feats)
        if not isinstance(feats, dict):
            raise _BadRow(f"{where}.features", "an object of features is required")
        ids.append(str(cand["id"]))
        rows.append(_encode(feats, features, f"{where}.features."))
    if len(set(ids)) != len(ids):
        raise _BadRow(name, "a candidate id appears twice")
    return ids, rows


def scenario_spec(env: Env) -> str:
    """The policy spec (TOML) of a simulator's logs: what ``write_logs`` writes, by name."""
    schema = env.feature_schema
    lines = [f'name = "{env.scenario}"']
    if schema.action:
        lines.append('kind = "ranking"')
    else:
        names = list(getattr(env, "action_names", ()))
        lines += ['kind = "actions"', f"actions = {json.dumps(names)}"]
    lines += ["", "[features]", f"context = {json.dumps(list(schema.context))}"]
    if schema.action:
        lines.append(f"action = {json.dumps(list(schema.action))}")
    return "\n".join(lines) + "\n"


def write_logs(path: Path, data: LoggedBandit, spec: PolicySpec) -> int:
    """Write ``data`` in the columns ``read_logs`` reads with ``spec``; returns the rows."""
    if path.suffix not in SUFFIXES:
        raise InvalidArgument(f"{path}: unknown format {path.suffix!r}; use one of "
                              f"{list(SUFFIXES)}")
    cols = spec.data
    context = data.context.tolist()
    rows: list[dict[str, Any]] = []
    for i, a in enumerate(data.action.tolist()):
        row: dict[str, Any] = dict(zip(spec.features.context, context[i], strict=True))
        if data.action_features is not None:
            if data.action_ids is None:
                raise InvalidArgument("write_logs: ranking logs need their candidate ids")
            k = (len(data.action_ids[i]) if data.mask is None
                 else int(data.mask[i].sum()))
            feats = data.action_features[i, :k].tolist()
            row[cols.action] = data.action_ids[i][a]
            row[cols.candidates] = [{"id": cid, "features": dict(zip(spec.features.action, f,
                                                                     strict=True))}
                                    for cid, f in zip(data.action_ids[i][:k], feats,
                                                      strict=True)]
        else:
            row[cols.action] = spec.actions[a]
        row[cols.reward] = float(data.reward[i])
        row[cols.propensity] = float(data.propensity[i])
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            for row in rows:
                if cols.candidates in row:
                    row = {**row, cols.candidates: json.dumps(row[cols.candidates])}
                writer.writerow(row)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise InvalidArgument(f"{path}: writing Parquet needs pyarrow (the train extra: "
                                  "uv sync --extra train, or pip install pyarrow)") from exc
        pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def simulate_logs(env: Env, path: Path, n: int, *, seed: int,
                  logging_policy: str = "heuristic") -> tuple[int, Path]:
    """Log n decisions of ``logging_policy`` on ``env`` offline (no server) into ``path``, and
    the scenario's spec beside it (``logs.parquet`` -> ``logs.spec.toml``); returns the rows
    written and the spec's path. ``policyloop train --spec SPEC --data FILE`` reads both."""
    text = scenario_spec(env)
    spec = parse_spec(text)
    rows = write_logs(path, collect_logs(env, n, seed=seed, logging_policy=logging_policy),
                      spec)
    spec_path = path.with_suffix(".spec.toml")
    spec_path.write_text(text)
    return rows, spec_path
