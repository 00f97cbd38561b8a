"""Benchmark snapshots, and the account of what changed when one no longer matches.

A snapshot is one JSON file per benchmark, profile and run (tests/benchmarks/__snapshots__/):

* the header: benchmark, profile, run label, row and unit counts, and the versions of the
  packages the predictions depend on (``VERSION_PACKAGES``; files recorded before they were
  kept have none);
* ``metrics``: every metric key, base, Lavender, Δ and n (units behind it), rounded;
* ``canaries``: the rows kept verbatim (question, both predictions), chosen to be informative:
  one row of every split/category first, preferring rows where the variants' scores or answers
  differ, then more such rows, spread over the groups (``canary_rows`` in snapshots.toml);
* ``row_scores``: every row, one line each: index, both scores and a short digest of both
  predictions, so a changed answer shows even when no score moved.

``dumps`` writes it with a fixed key order and one metric, canary or row per line, so a plain
``git diff`` reads as a list of changed rows. ``compare`` turns an accepted snapshot and the
current one into an account (changed metrics with the gate's band, changed rows grouped by
direction, changed canaries; first, when the file was recorded with other versions, a note
saying so); ``markdown`` renders it, ``write_account`` puts it in a report
folder as snapshot-diff.md and snapshot-diff.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lavender_checks.model import VARIANTS

__all__ = [
    "ROW_GROUPS", "SETTINGS", "VERSION_PACKAGES", "Current", "Settings", "SnapshotFormatError", "compare",
    "current_snapshot", "digest", "dumps", "load_settings", "markdown", "parse", "same_content", "unreadable",
    "version_change", "versions_notice", "write_account",
]

SETTINGS_FILE = Path(__file__).with_name("snapshots.toml")
HEADER_KEYS = ("benchmark", "profile", "run", "rows", "units")
# The packages whose versions a snapshot records: greedy tokens can change with them (in
# bfloat16 above all), with nothing else changed.
VERSION_PACKAGES = ("torch", "transformers", "peft")
METRIC_FIELDS = ("base", "lavender", "delta", "n")
CANARY_FIELDS = ("index", "group", "question", "base", "lavender")
ROW_FIELDS = ("index", "base score", "lavender score", "base digest", "lavender digest")
FILE_KEYS = (*HEADER_KEYS, "versions", "metrics", "canaries", "row_fields", "row_scores")
REWRITE_HINT = ("rewrite it from this run with --snapshot-update (the same options), "
                "then review `git diff` of the file and commit it")
# Groups of changed rows, in the order an account lists them.
ROW_GROUPS = {
    "right_to_wrong": "flipped right → wrong",
    "wrong_to_right": "wrong → right",
    "answer_changed": "answer changed, score same",
    "score_changed": "score changed, answer same",
    "added": "row added",
    "removed": "row removed",
}
_SLACK = 1e-9  # rounded numbers read back from JSON


class SnapshotFormatError(ValueError):
    """A snapshot file that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Settings:
    canary_rows: int
    canary_question_chars: int
    digest_chars: int
    metric_decimals: int
    row_score_decimals: int
    question_chars: int
    answer_chars: int
    message_rows: int


def load_settings(path: str | Path = SETTINGS_FILE) -> Settings:
    path = Path(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    names = [f for f in Settings.__dataclass_fields__]
    unknown = sorted(set(raw) - set(names))
    missing = [n for n in names if n not in raw]
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    for name in names:
        value = raw[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}")
    if raw["digest_chars"] > 64:
        raise ValueError(f"{path}: digest_chars must be at most 64 (SHA-256 hex), got {raw['digest_chars']}")
    return Settings(**raw)


SETTINGS = load_settings()


# ---------------------------------------------------------------------------- building


def digest(text: str | None, chars: int = SETTINGS.digest_chars) -> str | None:
    """The first ``chars`` hex digits of the SHA-256 of a prediction (None: no prediction)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:chars]


def _plain_index(value: Any) -> int | str:
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return str(value)


def _rounded(value: Any, decimals: int) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, decimals) + 0.0  # + 0.0: no "-0.0" in the file


def _row_score(value: Any, decimals: int) -> int | float | None:
    value = _rounded(value, decimals)
    if value is not None and value.is_integer():
        return int(value)  # 1 and 0, not 1.0 and 0.0: most rows of most benchmarks
    return value


def _shorten(text: Any, chars: int) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= chars else flat[: chars - 1].rstrip() + "…"


def _units_behind(result: Any, key: str) -> int | None:
    """Resampling units with a non-zero denominator in any term of the metric."""
    terms = result.forms.get(key)
    if not terms:
        return None
    counted = np.zeros(len(result.units), dtype=bool)
    for term in terms:
        counted |= np.asarray(term.denominator) != 0
    return int(counted.sum())


def score_table(base: Any, lavender: Any, decimals: int = SETTINGS.metric_decimals) -> dict[str, dict]:
    """Every metric key of the benchmark, in sorted order: base, Lavender, Δ and n."""
    table = {}
    for key in sorted(base.metrics):
        b, l = float(base.metrics[key]), float(lavender.metrics.get(key, math.nan))
        table[key] = {"base": _rounded(b, decimals), "lavender": _rounded(l, decimals),
                      "delta": _rounded(l - b, decimals), "n": _units_behind(base, key)}
    return table


@dataclass
class Current:
    """A benchmark's snapshot as this run computes it, with what an account shows beside it."""

    snapshot: dict[str, Any]
    questions: dict[Any, str] = field(default_factory=dict)  # index -> question
    groups: dict[Any, str] = field(default_factory=dict)  # index -> split/category
    answers: dict[str, dict[Any, str | None]] = field(default_factory=dict)  # variant -> index -> text


def _group_column(samples: Any) -> str | None:
    for column in ("category", "split"):  # MMBench and MME: category; ChartQA: split
        if column in samples.columns:
            return column
    return None


def _row_frame(benchmark: str, base: Any, lavender: Any) -> list[dict[str, Any]]:
    """One record per row of the benchmark: index, group, question, both scores, in order."""
    records: dict[Any, dict[str, Any]] = {}
    for variant, result in zip(VARIANTS, (base, lavender)):
        samples = result.samples
        for column in ("index", "score"):
            if column not in samples.columns:
                raise ValueError(f"{benchmark}: the {variant} samples have no {column!r} column")
        group = _group_column(samples)
        for rec in samples.to_dict("records"):
            index = _plain_index(rec["index"])
            row = records.setdefault(index, {"index": index, "group": "", "question": "",
                                             "base": None, "lavender": None})
            row[variant] = rec["score"]
            # Missing cells are NaN in a frame: only text counts as a group or a question.
            if group is not None and not row["group"] and isinstance(rec[group], str):
                row["group"] = rec[group]
            if not row["question"] and isinstance(rec.get("question"), str):
                row["question"] = rec["question"]
    return list(records.values())


def _pick_canaries(rows: list[dict[str, Any]], answers: Mapping[str, Mapping[Any, Any]],
                   count: int) -> list[dict[str, Any]]:
    """``count`` informative rows: first one of every group (the most telling row of it), then
    the rest by how telling they are, taking the groups in turn; returned in index order.

    How telling: the variants' scores differ (0), else their answers differ (1), else (2)."""
    def tier(row):
        b, l = row["base"], row["lavender"]
        if b is not None and l is not None and abs(float(b) - float(l)) > _SLACK:
            return 0
        return 1 if answers["base"].get(row["index"]) != answers["lavender"].get(row["index"]) else 2

    queues: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for position, row in enumerate(rows):
        queues.setdefault(row["group"], []).append((tier(row), position, row))
    for queue in queues.values():
        queue.sort(key=lambda m: m[:2])
    chosen = [queue.pop(0) for queue in list(queues.values())[:count]]
    for level in (0, 1, 2):  # then the groups in turn, the most telling rows first
        while len(chosen) < count:
            heads = [q for q in queues.values() if q and q[0][0] == level][: count - len(chosen)]
            if not heads:
                break
            chosen += [q.pop(0) for q in heads]
    return [row for _, _, row in sorted(chosen, key=lambda c: c[1])]


def current_snapshot(benchmark: str, base: Any, lavender: Any, predictions: Mapping[str, Mapping[Any, Any]],
                     *, profile: str, run: str, versions: Mapping[str, Any] | None = None,
                     settings: Settings = SETTINGS) -> Current:
    """The snapshot of one benchmark: header, score table, canaries and per-row scores.

    ``base``/``lavender``: the ScoreResults; ``predictions``: variant -> index -> raw text;
    ``versions``: package -> version of this run (the run metadata's), of which the snapshot
    keeps ``VERSION_PACKAGES``."""
    answers = {v: {_plain_index(i): (None if t is None else str(t)) for i, t in predictions.get(v, {}).items()}
               for v in VARIANTS}
    rows = _row_frame(benchmark, base, lavender)
    canaries = _pick_canaries(rows, answers, settings.canary_rows)
    snapshot = {
        "benchmark": benchmark,
        "profile": profile,
        "run": run,
        "rows": len(base.samples),
        "units": len(base.units),
        **({"versions": {p: versions.get(p) for p in VERSION_PACKAGES}} if versions is not None else {}),
        "metrics": score_table(base, lavender, settings.metric_decimals),
        "canaries": [{"index": r["index"], "group": r["group"],
                      "question": _shorten(r["question"], settings.canary_question_chars),
                      "base": answers["base"].get(r["index"]), "lavender": answers["lavender"].get(r["index"])}
                     for r in canaries],
        "row_fields": list(ROW_FIELDS),
        "row_scores": [[r["index"], _row_score(r["base"], settings.row_score_decimals),
                        _row_score(r["lavender"], settings.row_score_decimals),
                        digest(answers["base"].get(r["index"]), settings.digest_chars),
                        digest(answers["lavender"].get(r["index"]), settings.digest_chars)]
                       for r in rows],
    }
    return Current(snapshot=snapshot,
                   questions={r["index"]: r["question"] for r in rows},
                   groups={r["index"]: r["group"] for r in rows}, answers=answers)


# ---------------------------------------------------------------------------- the file


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _block(open_: str, lines: list[str], close: str, indent: str) -> list[str]:
    if not lines:
        return [open_ + close]
    return [open_, *(f"{indent}{line}," for line in lines[:-1]), f"{indent}{lines[-1]}", close]


def dumps(snapshot: Mapping[str, Any]) -> str:
    """The snapshot as JSON with a fixed key order and one metric, canary or row per line."""
    unknown = [k for k in snapshot if k not in FILE_KEYS]
    if unknown:
        raise ValueError(f"snapshot has keys this format does not write: {unknown}")
    parts = [f"  {_json(key)}: {_json(snapshot[key])}" for key in HEADER_KEYS if key in snapshot]
    if "versions" in snapshot:
        parts.append(f'  "versions": {_json(snapshot["versions"])}')
    if "metrics" in snapshot:
        metrics = [f"{_json(key)}: {_json({f: value.get(f) for f in METRIC_FIELDS})}"
                   for key, value in snapshot["metrics"].items()]
        parts.append("\n".join(_block('  "metrics": {', metrics, "  }", "    ")))
    if "canaries" in snapshot:
        canaries = [_json({f: canary.get(f) for f in CANARY_FIELDS}) for canary in snapshot["canaries"]]
        parts.append("\n".join(_block('  "canaries": [', canaries, "  ]", "    ")))
    if "row_fields" in snapshot:
        parts.append(f'  "row_fields": {_json(snapshot["row_fields"])}')
    if "row_scores" in snapshot:
        rows = [_json(row) for row in snapshot["row_scores"]]
        parts.append("\n".join(_block('  "row_scores": [', rows, "  ]", "    ")))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def parse(text: str | bytes, where: str = "snapshot") -> dict[str, Any]:
    """A snapshot file's content (this format, or the older one without canary groups and
    per-row scores). A file this version cannot read (empty, cut short, edited into another
    shape) raises ``SnapshotFormatError`` naming ``where`` and what is wrong."""
    if not text.strip():
        raise SnapshotFormatError(f"{where}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotFormatError(f"{where}: not JSON, or cut short ({exc})") from None
    if not isinstance(data, dict) or "benchmark" not in data or not isinstance(data.get("metrics", {}), dict):
        raise SnapshotFormatError(f"{where}: not a benchmark snapshot (no 'benchmark' key or no 'metrics' table)")
    versions = data.get("versions")
    if versions is not None and not (isinstance(versions, dict)
                                     and all(isinstance(v, (str, type(None))) for v in versions.values())):
        raise SnapshotFormatError(f"{where}: versions is {versions!r}, not a table package -> version")
    unknown = [key for key in data if key not in FILE_KEYS]
    if unknown:
        raise SnapshotFormatError(f"{where}: key(s) this format does not have: {', '.join(unknown)} "
                                  f"(it has {', '.join(FILE_KEYS)})")
    for key, value in data.get("metrics", {}).items():
        if not isinstance(value, dict):
            raise SnapshotFormatError(f"{where}: metrics {key!r} is {value!r}, not a table of {', '.join(METRIC_FIELDS)}")
    canaries = data.get("canaries", [])
    if not isinstance(canaries, list) or not all(isinstance(c, dict) and "index" in c for c in canaries):
        raise SnapshotFormatError(f"{where}: canaries must be a list of tables with an index")
    fields = data.get("row_fields")
    if "row_scores" in data and fields != list(ROW_FIELDS):
        raise SnapshotFormatError(f"{where}: row_fields is {fields!r}, this version reads {list(ROW_FIELDS)}")
    if not isinstance(data.get("row_scores", []), list):
        raise SnapshotFormatError(f"{where}: row_scores must be a list")
    for number, row in enumerate(data.get("row_scores", []), start=1):
        if not isinstance(row, list) or len(row) != len(ROW_FIELDS):
            raise SnapshotFormatError(f"{where}: row_scores entry {number} is {row!r}, not [{', '.join(ROW_FIELDS)}]")
    return data


def unreadable(problem: str, *, benchmark: str, case: str = "", location: str = "") -> dict[str, Any]:
    """The account of an accepted snapshot file that cannot be read (``problem``: the
    ``SnapshotFormatError`` message): nothing to compare, only how to rewrite it."""
    return {"benchmark": benchmark, "case": case, "snapshot": location, "status": "unreadable",
            "header": [], "metrics": [],
            "rows": {"counts": {k: 0 for k in ROW_GROUPS}, "groups": {k: [] for k in ROW_GROUPS}},
            "canaries": {"changed": [], "added": [], "dropped": []},
            "notes": [problem, REWRITE_HINT]}


# ---------------------------------------------------------------------------- comparing


def same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two snapshots hold the same results, whatever versions each records."""
    def without_versions(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k != "versions"}

    return dumps(without_versions(a)) == dumps(without_versions(b))


def _versions_text(versions: Mapping[str, Any]) -> str:
    return ", ".join(f"{p} {versions.get(p) or '?'}" for p in VERSION_PACKAGES)


def version_change(accepted: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str:
    """'' when both snapshots record the same versions or either records none; else what
    differs, e.g. 'recorded with torch 2.11.0, ...; this run: torch 2.13.0+cpu, ...'."""
    a = (accepted or {}).get("versions")
    n = (now or {}).get("versions")
    if not a or not n or all(a.get(p) == n.get(p) for p in VERSION_PACKAGES):
        return ""
    return f"recorded with {_versions_text(a)}; this run: {_versions_text(n)}"


_VERSIONS_WHY = ("greedy tokens can differ between versions (in bfloat16 above all) with nothing "
                 "else changed: install the recorded versions (constraints.txt) to test the code and "
                 "the adapter, or review the change and record the snapshot on these versions with "
                 "--snapshot-update")


def versions_notice(accounts: Iterable[Mapping[str, Any]]) -> str:
    """The lines that open a session's verdicts when any accepted snapshot was recorded with
    other versions than this run's ('' when none was)."""
    changes = [(a["benchmark"], a.get("versions_changed", "")) for a in accounts]
    changes = [(b, c) for b, c in changes if c]
    if not changes:
        return ""
    failed = [a["benchmark"] for a in accounts if a.get("versions_changed") and a["status"] == "changed"]
    outcome = (f"the snapshots of {', '.join(failed)} differ, and the versions may be why"
               if failed else "the snapshots match all the same")
    lines = [f"SNAPSHOT VERSIONS: accepted snapshots were recorded with other versions than this run's; "
             f"{outcome}; {_VERSIONS_WHY}."]
    lines += [f"  {benchmark}: {change}" for benchmark, change in dict(changes).items()]
    return "\n".join(lines)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > _SLACK
    return a != b


def _gate_of(verdicts: Iterable[Mapping[str, Any]], benchmark: str, key: str) -> list[dict[str, Any]]:
    """The gate's verdicts (now) on this metric: quantity, pass/fail, band, reported."""
    out = []
    for v in verdicts:
        if v["benchmark"] == benchmark and v["metric"] == key:
            band = v.get("band")
            out.append({"quantity": v["quantity"], "status": v["status"],
                        "band": None if band is None else [None if b is None or (isinstance(b, float) and math.isinf(b))
                                                           else b for b in band],
                        "reported": v.get("reported"), "row": v.get("row_id")})
    return out


def _rows_of(snapshot: Mapping[str, Any]) -> dict[Any, dict[str, tuple[Any, Any]]] | None:
    if "row_scores" not in snapshot:
        return None
    out = {}
    for index, bs, ls, bd, ld in snapshot["row_scores"]:
        out[index] = {"base": (bs, bd), "lavender": (ls, ld)}
    return out


def _canaries_of(snapshot: Mapping[str, Any]) -> dict[Any, Mapping[str, Any]]:
    return {c["index"]: c for c in snapshot.get("canaries", [])}


def _row_kind(accepted: tuple[Any, Any] | None, now: tuple[Any, Any] | None) -> str | None:
    if accepted == now:
        return None
    if accepted is None:
        return "added"
    if now is None:
        return "removed"
    (a_score, a_digest), (n_score, n_digest) = accepted, now
    scored = a_score is not None and n_score is not None
    if scored and float(n_score) < float(a_score) - _SLACK:
        return "right_to_wrong"
    if scored and float(n_score) > float(a_score) + _SLACK:
        return "wrong_to_right"
    if a_digest != n_digest:
        return "answer_changed"
    if (a_score is None) != (n_score is None):
        return "score_changed"
    return None


def _accepted_text(canary: Mapping[str, Any] | None, variant: str, row: tuple[Any, Any] | None) -> str | None:
    """The accepted full answer where the canary kept it and it is the one the digest names."""
    if canary is None or row is None or canary.get(variant) is None:
        return None
    text = canary[variant]
    return text if row[1] is None or digest(text, len(row[1])) == row[1] else None


def compare(accepted: Mapping[str, Any] | None, current: Current | None, *,
            verdicts: Iterable[Mapping[str, Any]] = (), case: str = "", location: str = "",
            missing_reason: str = "") -> dict[str, Any]:
    """The account of one benchmark: what differs between the accepted snapshot and this run.

    accepted: the parsed snapshot file (None: none recorded). current: this run's (None: the
    benchmark has no result in this run; ``missing_reason`` says why). verdicts: the gate's
    verdicts as dicts (``Verdict.to_dict()``), for the band of each changed metric.
    Returns plain data (JSON-ready); ``status`` is "unchanged", "changed", "new" or "removed"
    (``snapshot_extension.review`` adds "created" and "updated" under --snapshot-update; an
    accepted file that cannot be read has the account ``unreadable`` gives)."""
    now = current.snapshot if current is not None else None
    benchmark = (now or accepted or {}).get("benchmark", "")
    account: dict[str, Any] = {"benchmark": benchmark, "case": case, "snapshot": location,
                               "status": "unchanged", "versions_changed": version_change(accepted, now),
                               "header": [], "metrics": [],
                               "rows": {"counts": {k: 0 for k in ROW_GROUPS}, "groups": {k: [] for k in ROW_GROUPS}},
                               "canaries": {"changed": [], "added": [], "dropped": []}, "notes": []}
    if now is None:
        account["status"] = "removed"
        account["notes"].append(f"this run has no result for {benchmark}: {missing_reason or 'not computed'}")
        if accepted is not None:
            account["header"] = [{"key": k, "accepted": accepted.get(k), "now": None} for k in ("rows", "units")]
            account["metrics"] = [{"key": k, "accepted": v, "now": None, "gate": []}
                                  for k, v in accepted.get("metrics", {}).items()]
        return account
    if accepted is None:
        account["status"] = "new"
        account["notes"].append("no accepted snapshot: record one with --snapshot-update, review it, commit it")
        return account

    verdicts = list(verdicts)
    if account["versions_changed"]:  # first: it may explain everything below
        account["notes"].append(f"{account['versions_changed']}: {_VERSIONS_WHY}")
    for key in HEADER_KEYS:
        if _differs(accepted.get(key), now.get(key)):
            account["header"].append({"key": key, "accepted": accepted.get(key), "now": now.get(key)})

    a_metrics, n_metrics = accepted.get("metrics", {}), now.get("metrics", {})
    for key in sorted(set(a_metrics) | set(n_metrics)):
        a, n = a_metrics.get(key), n_metrics.get(key)
        if a is not None and n is not None and not any(_differs(a.get(f), n.get(f)) for f in METRIC_FIELDS):
            continue
        account["metrics"].append({"key": key, "accepted": a, "now": n, "gate": _gate_of(verdicts, benchmark, key)})

    a_canaries, n_canaries = _canaries_of(accepted), _canaries_of(now)
    a_rows, n_rows = _rows_of(accepted), _rows_of(now)
    listed: set[tuple[Any, str]] = set()
    if a_rows is None:
        account["notes"].append("the accepted snapshot has no per-row scores (an older format): "
                                "only metrics and canaries are compared")
    else:
        order = list(n_rows) + [i for i in a_rows if i not in n_rows]
        for index in order:
            for variant in VARIANTS:
                a = a_rows.get(index, {}).get(variant)
                n = n_rows.get(index, {}).get(variant)
                kind = _row_kind(a, n)
                if kind is None:
                    continue
                listed.add((index, variant))
                a_canary = a_canaries.get(index)
                account["rows"]["groups"][kind].append({
                    "index": index, "variant": variant,
                    "group": current.groups.get(index, (a_canary or {}).get("group", "")),
                    "question": current.questions.get(index, (a_canary or {}).get("question", "")),
                    "accepted_answer": _accepted_text(a_canary, variant, a),
                    "accepted_digest": a[1] if a else None, "accepted_score": a[0] if a else None,
                    "new_answer": current.answers[variant].get(index) if n else None,
                    "new_digest": n[1] if n else None, "new_score": n[0] if n else None,
                })
        for kind, entries in account["rows"]["groups"].items():
            account["rows"]["counts"][kind] = len(entries)

    for index in a_canaries.keys() & n_canaries.keys():
        for variant in VARIANTS:
            a_text, n_text = a_canaries[index].get(variant), n_canaries[index].get(variant)
            if a_text != n_text and (index, variant) not in listed:
                account["canaries"]["changed"].append({"index": index, "variant": variant,
                                                       "accepted": a_text, "now": n_text})
    account["canaries"]["changed"].sort(key=lambda c: (str(type(c["index"])), c["index"], c["variant"]))
    account["canaries"]["added"] = sorted(n_canaries.keys() - a_canaries.keys(), key=lambda i: (str(type(i)), i))
    account["canaries"]["dropped"] = sorted(a_canaries.keys() - n_canaries.keys(), key=lambda i: (str(type(i)), i))

    changed = (account["header"] or account["metrics"] or any(account["rows"]["counts"].values())
               or any(account["canaries"].values()))
    # Anything else that differs (a canary's question or group, row order) still counts.
    if changed or not same_content(accepted, now):
        account["status"] = "changed"
        if not changed:
            account["notes"].append("the file differs only in canary questions/groups or row order: see git diff")
        if not accepted.get("versions") and now.get("versions"):
            account["notes"].append(f"the accepted snapshot records no versions (recorded before snapshots "
                                    f"kept them); this run: {_versions_text(now['versions'])}")
    return account


# ---------------------------------------------------------------------------- rendering


def _num(value: Any, signed: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _count(value: Any) -> str:
    """Row and unit counts as whole numbers ("5349", never "5349.00" or "5.349e+03")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return _num(value)


def _score(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _moved(a: Any, n: Any, fmt=_num) -> str:
    """``n``, or ``a → n`` when it changed."""
    return fmt(n) if not _differs(a, n) else f"{fmt(a)} → {fmt(n)}"


def _band_cell(gate: list[Mapping[str, Any]]) -> str:
    if not gate:
        return "not gated"
    cells = []
    for g in gate:
        if g["status"] == "missing" or g["band"] is None:
            cells.append(f"{g['quantity']}: no band")
            continue
        lo, hi = g["band"]
        band = f"[{_num(lo, g['quantity'] == 'gain')}, {'+inf' if hi is None else _num(hi, g['quantity'] == 'gain')}]"
        cells.append(f"{g['quantity']} {'in' if g['status'] == 'pass' else 'OUTSIDE'} {band}")
    return "; ".join(cells)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[_cell(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def _answer(text: Any, dig: Any, chars: int) -> str:
    if text is not None:
        return _json(_shorten(text, chars)) if str(text).strip() else _json(str(text))
    return f"#{dig}" if dig else "—"


def _account_lines(account: Mapping[str, Any], rows_per_group: int | None, settings: Settings) -> list[str]:
    status, benchmark = account["status"], account["benchmark"]
    counts = account["rows"]["counts"]
    if status == "removed":
        title = f"{benchmark}: removed from the run"
    elif status == "new":
        title = f"{benchmark}: no accepted snapshot"
    elif status == "unreadable":
        title = f"{benchmark}: the accepted snapshot cannot be read"
    elif status == "created":
        title = f"{benchmark}: snapshot recorded (there was none)"
    elif status == "unchanged":
        title = f"{benchmark}: unchanged"
    else:
        canaries = account["canaries"]
        bits = [f"{n} {what}" for n, what in (
            (len(account["header"]), "header field(s)"), (len(account["metrics"]), "metric(s)"),
            (sum(counts.values()), "row(s)"), (len(canaries["changed"]), "canary text(s)"),
            (len(canaries["added"]) + len(canaries["dropped"]), "canary choice(s)")) if n]
        title = f"{benchmark}: {', '.join(bits) or 'snapshot'} changed"
        if status == "updated":
            title += ", accepted with --snapshot-update"
    lines = [f"### {title}" + (f" ({account['case']})" if account.get("case") else ""), ""]
    if account.get("snapshot"):
        lines += [f"snapshot: {account['snapshot']}", ""]
    lines += [f"- {note}" for note in account["notes"]]
    if account["notes"]:
        lines.append("")
    if account["header"]:
        lines += [f"- {h['key']}: {_count(h['accepted'])} → {_count(h['now'])}" for h in account["header"]] + [""]
    if account["metrics"]:
        table = []
        for m in account["metrics"]:
            a, n = m["accepted"] or {}, m["now"] or {}
            table.append([m["key"], _moved(a.get("base"), n.get("base")),
                          _moved(a.get("lavender"), n.get("lavender")),
                          _moved(a.get("delta"), n.get("delta"), lambda v: _num(v, True)),
                          _moved(a.get("n"), n.get("n"), fmt=_count), _band_cell(m["gate"])])
        lines += ["Metrics (accepted → now; the gate's band for the value now):", ""]
        lines += _table(["metric", "base", "Lavender", "Δ", "n", "gate band"], table) + [""]
    if any(counts.values()):
        summary = ", ".join(f"{counts[k]} {label}" for k, label in ROW_GROUPS.items() if counts[k])
        lines += [f"Rows (one per variant): {summary}", ""]
        for kind, label in ROW_GROUPS.items():
            entries = account["rows"]["groups"][kind]
            if not entries:
                continue
            shown = entries if rows_per_group is None else entries[:rows_per_group]
            lines += [f"{label} ({len(entries)}):", ""]
            lines += _table(["index", "variant", "group", "question", "accepted answer", "new answer", "score"], [
                [e["index"], e["variant"], e["group"], _json(_shorten(e["question"], settings.question_chars)),
                 _answer(e["accepted_answer"], e["accepted_digest"], settings.answer_chars),
                 _answer(e["new_answer"], e["new_digest"], settings.answer_chars),
                 _moved(e["accepted_score"], e["new_score"], fmt=_score)]
                for e in shown])
            if len(shown) < len(entries):
                lines.append(f"… and {len(entries) - len(shown)} more (all in snapshot-diff.md / .json)")
            lines.append("")
    canaries = account["canaries"]
    if canaries["changed"]:
        lines += ["Canary texts changed (per-row digest unchanged):", ""]
        lines += _table(["index", "variant", "accepted", "now"], [
            [c["index"], c["variant"], _answer(c["accepted"], None, settings.answer_chars),
             _answer(c["now"], None, settings.answer_chars)] for c in canaries["changed"]]) + [""]
    if canaries["added"] or canaries["dropped"]:
        lines += [f"Canary set: added {canaries['added'] or 'none'}, dropped {canaries['dropped'] or 'none'}", ""]
    return lines


def markdown(accounts: Iterable[Mapping[str, Any]], *, rows_per_group: int | None = None,
             settings: Settings = SETTINGS, title: str | None = None) -> str:
    """The accounts as Markdown (aligned tables: readable in a terminal too). ``rows_per_group``
    None lists every changed row."""
    lines = [f"## {title}", ""] if title else []
    accounts = list(accounts)
    quiet = [a["benchmark"] for a in accounts if a["status"] == "unchanged"]
    for account in accounts:
        if account["status"] != "unchanged":
            lines += _account_lines(account, rows_per_group, settings)
    if quiet:
        lines += [f"Unchanged: {', '.join(quiet)}", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_account(folder: str | Path, accounts: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """``folder/snapshot-diff.md`` (every changed row) and ``folder/snapshot-diff.json``."""
    folder = Path(folder)
    accounts = sorted(accounts, key=lambda a: (a["benchmark"], a.get("case", "")))
    changed = [a for a in accounts if a["status"] != "unchanged"]
    md, js = folder / "snapshot-diff.md", folder / "snapshot-diff.json"
    head = (f"{len(changed)} of {len(accounts)} benchmark snapshot(s) differ from the accepted ones"
            if changed else f"All {len(accounts)} benchmark snapshot(s) match the accepted ones")
    md.write_text(markdown(accounts, title=f"Snapshot changes: {head}"), encoding="utf-8")
    js.write_text(json.dumps({"changed": len(changed), "benchmarks": accounts}, ensure_ascii=False, indent=1) + "\n",
                  encoding="utf-8")
    return md, js
