#!/usr/bin/env python3
"""Check the Grafana dashboard against live data: every panel's PromQL must parse and return a series.

    python3 docker/check_dashboard.py http://127.0.0.1:9090 [--dashboard FILE] [--wait 90]

Reads each panel's target expressions from the dashboard JSON, replaces Grafana's interval variables
($__rate_interval, $__interval, $__range) with --rate-interval, and sends each expression to a running
Prometheus (loopback only) through /api/v1/query. An expression fails when Prometheus cannot parse it or
returns no series; expressions that return nothing yet are asked again until --wait seconds have
passed (a fresh Prometheus needs a few scrapes before rate() has two samples). Exit status 0 when every
expression passes, 1 otherwise, 2 on bad arguments. Standard library only, so it runs with any python3.

Skip-list: series that exist only in some set-ups. An expression that uses one of them must still
parse, but may return no series:
    charlstm_session_store_seconds   recorded only by the Redis session store
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "charlstm.json"
SKIP: dict[str, str] = {}  # metric family -> why a panel's series may be absent (every panel's series exist today)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
GRAFANA_INTERVALS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")
SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
# PromQL words that look like metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, in order; row headers themselves are not panels."""
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") != "row":
            out.append(panel)
        out.extend(panels(panel) if panel.get("panels") else [])
    return out


def queries(dashboard: dict) -> list[Query]:
    """Each panel's target expressions. A panel without any is an error: it would show nothing."""
    found = []
    for panel in panels(dashboard):
        title = panel.get("title") or f"panel {panel.get('id')}"
        exprs = [t for t in panel.get("targets", []) if (t.get("expr") or "").strip() and not t.get("hide")]
        if not exprs:
            raise ValueError(f"panel {title!r} has no PromQL target")
        found.extend(Query(title, t.get("refId", "?"), t["expr"].strip()) for t in exprs)
    return found


def promql(expr: str, rate_interval: str = "1m") -> str:
    """The expression as Prometheus takes it: Grafana's interval variables replaced."""
    return GRAFANA_INTERVALS.sub(rate_interval, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (a light scan, enough for this dashboard's PromQL)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', promql(expr))  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        if m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def family(name: str) -> str:
    """charlstm_x_seconds_bucket -> charlstm_x_seconds: the name the skip-list and metrics.py use."""
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def skipped(query: Query) -> str | None:
    for name in metric_names(query.expr):
        if family(name) in SKIP or name in SKIP:
            return SKIP.get(family(name)) or SKIP[name]
    return None


def ask(prometheus: str, expr: str, timeout: float = 10.0) -> tuple[bool, int, str]:
    """(parsed, number of series, error message) for one instant query."""
    url = prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:  # 400 bad_data: the expression does not parse
        try:
            body = json.load(e)
        except ValueError:
            return False, 0, f"HTTP {e.code}"
    if body.get("status") != "success":
        return False, 0, f"{body.get('errorType')}: {body.get('error')}"
    return True, len(body["data"]["result"]), ""


def check(prometheus: str, found: list[Query], wait_s: float, rate_interval: str, out=sys.stdout) -> bool:
    """Ask until every expression passes or `wait_s` is over; print one line per expression."""
    deadline = time.monotonic() + wait_s
    pending = list(found)
    results: dict[Query, tuple[str, str]] = {}
    while True:
        still = []
        for q in pending:
            parsed, series, error = ask(prometheus, promql(q.expr, rate_interval))
            reason = skipped(q)
            if not parsed:
                results[q] = ("FAIL", f"does not parse: {error}")  # asking again cannot help
            elif series:
                results[q] = ("ok", f"{series} series")
            elif reason:
                results[q] = ("skip", f"no series; {reason}")
            else:
                results[q] = ("FAIL", "no series")
                still.append(q)
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(2.0)  # the next scrape brings new samples; the deadline bounds the wait
    for q in found:
        status, detail = results[q]
        print(f"{status:4}  {q.panel} [{q.ref_id}]: {detail}\n      {q.expr}", file=out)
    failed = sum(1 for s, _ in results.values() if s == "FAIL")
    print(f"{len(found) - failed} of {len(found)} expressions pass"
          + (f"; {failed} fail" if failed else ""), file=out)
    return failed == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prometheus", help="the Prometheus base URL, on loopback (http://127.0.0.1:9090)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="the dashboard JSON (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=90.0, help="seconds to keep asking for missing series (default: %(default)s)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for (default: %(default)s)")
    args = parser.parse_args(argv)
    host = urllib.parse.urlsplit(args.prometheus).hostname
    if host not in LOOPBACK:
        parser.error(f"the Prometheus URL must be on loopback ({', '.join(sorted(LOOPBACK))}), not {host!r}")
    try:
        found = queries(json.loads(args.dashboard.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        print(f"check_dashboard: {args.dashboard}: {e}", file=sys.stderr)
        return 1
    return 0 if check(args.prometheus, found, args.wait, args.rate_interval) else 1


if __name__ == "__main__":
    sys.exit(main())
