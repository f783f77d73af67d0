"""The Grafana dashboard and docker/check_dashboard.py: every panel has a PromQL target, the targets read
only metrics the service exposes (compared with a live test server's /metrics), and against a real
Prometheus scraping a real server every expression parses and returns a series."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from ..server import ROOT, Server, free_port, wait_until

GRAFANA = ROOT / "docker" / "grafana"
_spec = importlib.util.spec_from_file_location("check_dashboard", ROOT / "docker" / "check_dashboard.py")
check_dashboard = sys.modules.setdefault("check_dashboard", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check_dashboard)  # a script in docker/, not part of the package


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(check_dashboard.DASHBOARD.read_text(encoding="utf-8"))


def exposed_names(exposition: str) -> set[str]:
    """Every series name /metrics can show, including those of labelled metrics with no sample yet
    (their HELP and TYPE lines are there before the first sample)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            names.update(name + s for s in {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
                                            "counter": ("_total",)}.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_every_panel_has_a_promql_target_for_what_operators_watch(dashboard):
    found = check_dashboard.queries(dashboard)
    titles = {q.panel for q in found}
    assert titles == {p["title"] for p in check_dashboard.panels(dashboard)}
    names = set().union(*(check_dashboard.metric_names(q.expr) for q in found))
    for needed in ("charlstm_generated_tokens_total", "charlstm_time_to_first_token_seconds_bucket",
                   "charlstm_inter_token_latency_seconds_bucket", "charlstm_batch_size_bucket", "charlstm_waiting_streams",
                   "charlstm_running_streams", "charlstm_rejected_requests_total", "charlstm_client_disconnects_total",
                   "charlstm_live_sessions", "charlstm_session_removals_total", "charlstm_requests_total",
                   "charlstm_engine_step_duration_seconds_bucket", "charlstm_prefill_slice_duration_seconds_bucket",
                   "charlstm_session_store_seconds_bucket"):
        assert needed in names, needed
    exprs = " ".join(q.expr for q in found)
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs  # p50 and p99
    # A panel without a target is an error, not an empty chart.
    with pytest.raises(ValueError, match="no PromQL target"):
        check_dashboard.queries({"panels": [{"type": "row", "panels": [{"title": "empty", "targets": [{"expr": " "}]}]}]})


def test_the_panels_read_only_metrics_the_service_exposes(dashboard, server):
    httpx.post(server.url + "/generate", json={"max_new_tokens": 5}, timeout=30.0)
    exposed = exposed_names(httpx.get(server.url + "/metrics", timeout=5.0).text)
    unknown = {}
    for q in check_dashboard.queries(dashboard):
        for name in check_dashboard.metric_names(q.expr) - exposed:
            if check_dashboard.family(name) not in check_dashboard.SKIP:
                unknown.setdefault(q.panel, set()).add(name)
    assert unknown == {}
    # Every session store is timed, so the store panel has its series from the start (labels at zero).
    assert "charlstm_session_store_seconds_bucket" in exposed
    assert not any(check_dashboard.skipped(q) for q in check_dashboard.queries(dashboard))


def test_the_expression_scan():
    scan = check_dashboard.metric_names
    assert scan('histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{route="/x (y)", status=~"4.."}[$__rate_interval])))') == {"a_seconds_bucket"}
    assert scan("sum(rate(a_total[5m])) / sum without (job) (b) or on (x) vector(0)") == {"a_total", "b"}
    assert scan("max_over_time(c:recorded[1h] offset 5m) > bool 2") == {"c:recorded"}
    assert check_dashboard.promql("rate(a[$__rate_interval]) + rate(b[${__interval}])", "30s") == "rate(a[30s]) + rate(b[30s])"
    assert check_dashboard.family("charlstm_session_store_seconds_bucket") == "charlstm_session_store_seconds"


def test_the_datasource_and_dashboard_provisioning_match(dashboard):
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"].startswith("http://127.0.0.1:")
    for panel in check_dashboard.panels(dashboard):
        uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
        assert uids == {source["uid"]}, panel["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "charlstm.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["dashboards"]  # never started by a plain `up` (CI)
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert all("profiles" not in s for name, s in compose["services"].items() if name != "grafana")


def test_the_check_refuses_a_prometheus_off_loopback(capsys):
    with pytest.raises(SystemExit) as exit_:
        check_dashboard.main(["http://192.0.2.1:9090", "--wait", "0"])  # nothing is sent: refused before
    assert exit_.value.code == 2 and "loopback" in capsys.readouterr().err


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (CI installs it for promtool)")
def test_every_expression_returns_series_from_a_real_prometheus(dashboard, trained_store, tmp_path):
    srv = Server(trained_store, max_batch_size=1, max_queue=1, max_sessions=1, max_new_tokens=1_000_000)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "charlstm", "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        traffic(srv)
        wait_until(lambda: _ready(url), timeout=30.0, what="Prometheus to be ready")
        out = io.StringIO()
        assert check_dashboard.check(url, check_dashboard.queries(dashboard), wait_s=60.0, rate_interval="1m", out=out), out.getvalue()
        report = out.getvalue()
        n = len(check_dashboard.queries(dashboard))
        assert "FAIL" not in report and "skip" not in report and f"{n} of {n} expressions pass" in report

        broken = dict(dashboard, panels=[
            {"title": "typo", "datasource": {}, "targets": [{"refId": "A", "expr": "sum(rate(charlstm_generated_token_total[1m]))"}]},
            {"title": "syntax", "datasource": {}, "targets": [{"refId": "A", "expr": "sum(rate(charlstm_generated_tokens_total[1m])"}]}])
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        out = io.StringIO()
        assert not check_dashboard.check(url, check_dashboard.queries(broken), wait_s=0.0, rate_interval="1m", out=out)
        assert "FAIL  typo [A]: no series" in out.getvalue() and "FAIL  syntax [A]: does not parse" in out.getvalue()
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
        srv.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def traffic(srv: Server) -> None:
    """Requests that make every series of the dashboard appear: plain and streamed generation, a refusal
    (one row and one queue place, both taken), two client disconnects, sessions with an eviction."""
    with httpx.Client(base_url=srv.url, timeout=30.0) as client:
        client.post("/generate", json={"prompt": "KING:", "max_new_tokens": 50})
        body = {"max_new_tokens": 1_000_000, "stream": True}
        with client.stream("POST", "/generate", json=body) as running:
            chunks = running.iter_bytes()  # kept: a dropped iterator closes the response
            next(chunks)
            with client.stream("POST", "/generate", json=body) as queued:
                wait_until(lambda: srv.metric("charlstm_waiting_streams") == 1, what="a queued stream")
                assert client.post("/generate", json={"max_new_tokens": 1}).status_code == 429
                assert queued.status_code == 200
        wait_until(lambda: srv.metric("charlstm_client_disconnects_total") == 2, what="both disconnects")
        first = client.post("/sessions", json={"prompt": "QUEEN:"}).json()["session_id"]
        second = client.post("/sessions", json={}).json()["session_id"]  # the cap is one: the first is evicted
        assert client.get(f"/sessions/{first}").status_code == 404
        client.post(f"/sessions/{second}/generate", json={"max_new_tokens": 20})
