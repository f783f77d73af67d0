"""/metrics as an operator reads it: process and Python series, build info, capacity, labelled counters that
exist from the first scrape, and every reply counted under its route."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.model import store
from service.metrics import FINISH_REASONS, REJECTION_REASONS, SESSION_REMOVAL_REASONS

from ..server import Server


def scrape(server) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of /metrics by name, parsed with prometheus-client's own parser."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 when the series is absent (as rate() would see it)."""
    want = {k: str(v) for k, v in labels.items()}
    matches = [v for got, v in samples.get(name, []) if got == want]
    assert len(matches) <= 1, (name, labels)
    return matches[0] if matches else 0.0


@pytest.fixture(scope="module")
def fresh_server(trained_store):
    """A server no request has reached yet."""
    srv = Server(trained_store)
    yield srv
    srv.stop()


def test_labelled_counters_exist_at_zero_for_every_known_reason_from_the_first_scrape(fresh_server):
    samples = scrape(fresh_server)
    for name, reasons in (("charlstm_streams_finished_total", FINISH_REASONS),
                          ("charlstm_rejected_requests_total", REJECTION_REASONS),
                          ("charlstm_session_removals_total", SESSION_REMOVAL_REASONS)):
        assert sorted(labels["reason"] for labels, _ in samples[name]) == sorted(reasons), name
        assert all(v == 0 for _, v in samples[name]), name
    assert samples["charlstm_sessions_created_total"] == [({}, 0.0)]


def test_process_and_python_series_are_exported(fresh_server):
    samples = scrape(fresh_server)
    assert value(samples, "process_resident_memory_bytes") > 10e6  # a process with a model loaded
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "process_start_time_seconds") > 0
    assert any(v == 1 for _, v in samples["python_info"])
    assert any(labels.get("generation") == "0" for labels, _ in samples["python_gc_collections_total"])


def test_build_info_names_version_model_weights_and_torch(server, trained_store):
    card = store.load("tiny", trained_store).card
    [(labels, v)] = scrape(server)["charlstm_build_info"]
    assert v == 1
    assert labels == {"version": __version__, "model": f"tiny@{card['version']}", "weights_sha256": card["weights_sha256"][:16],
                      "torch": importlib.metadata.version("torch")}  # the installed torch ("none" in a serving install)


def test_capacity_gauges_are_the_limits_in_force(small_server):
    samples = scrape(small_server)
    limits = httpx.get(small_server.url + "/info").json()["limits"]
    assert value(samples, "charlstm_max_batch_size") == limits["max_batch_size"] == 2
    assert value(samples, "charlstm_max_queue") == limits["max_queue"] == 1
    assert value(samples, "charlstm_max_sessions") == limits["max_sessions"] == 3


def test_docs_openapi_and_413_replies_are_counted_under_their_routes(small_server):
    url = small_server.url

    def counts() -> dict[tuple[str, str, str], float]:
        return {(labels["route"], labels["method"], labels["status"]): v
                for labels, v in scrape(small_server).get("charlstm_requests_total", [])}

    before = counts()
    assert httpx.get(url + "/docs").status_code == 200
    assert httpx.get(url + "/openapi.json").status_code == 200
    assert httpx.get(url + "/docs/assets/swagger-ui.css").status_code == 200
    too_big = b'{"prompt": "' + b"a" * 8000 + b'"}'
    assert httpx.post(url + "/generate", content=too_big, headers={"content-type": "application/json"}).status_code == 413
    chunked = httpx.post(url + "/sessions/abc/generate", content=iter([too_big[:4000], too_big[4000:]]),
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert httpx.get(url + "/no/such/route").status_code == 404
    after = counts()
    grew = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert grew == {("/docs", "GET", "200"): 1, ("/openapi.json", "GET", "200"): 1,
                    ("/docs/assets/{path}", "GET", "200"): 1, ("/generate", "POST", "413"): 1,
                    ("/sessions/{session_id}/generate", "POST", "413"): 1, ("unmatched", "GET", "404"): 1,
                    ("/metrics", "GET", "200"): 1}  # the first scrape, counted when it ended


def test_sessions_created_counts_each_new_session(server):
    before = value(scrape(server), "charlstm_sessions_created_total")
    for _ in range(2):
        assert httpx.post(server.url + "/sessions", json={"prompt": "KING:"}).status_code == 201
    assert value(scrape(server), "charlstm_sessions_created_total") == before + 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)")
def test_the_full_exposition_passes_promtool(fresh_server):
    text = httpx.get(fresh_server.url + "/metrics").text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("few", [8, 0])  # a few values at once go through Python's bisect, more through numpy
def test_a_counted_histogram_exports_what_a_histogram_fed_one_value_at_a_time_exports(few, monkeypatch):
    """The inter-token histogram takes (gap, count) pairs; its series equal prometheus-client's own
    Histogram's after the same values, each observed count times (bucket edges included)."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from service import metrics
    from service.metrics import FAST, CountedHistogram

    monkeypatch.setattr(metrics, "FEW_VALUES", few)

    values, counts = [0.00005, 0.0001, 0.0003, 0.0025, 2.0, 0.0], [1, 2, 3, 4, 5, 6]
    mine, theirs = CollectorRegistry(), CollectorRegistry()
    counted = CountedHistogram("gap_seconds", "gaps", FAST, mine)
    counted.observe_counted("m@v1", values[:3], counts[:3])
    counted.observe_counted("m@v1", values[3:], counts[3:])
    counted.observe_counted("m@v2", values[:1], counts[:1])  # another model's series, apart
    plain = Histogram("gap_seconds", "gaps", ["model"], buckets=FAST, registry=theirs)
    for v, c in zip(values, counts):
        for _ in range(c):
            plain.labels("m@v1").observe(v)
    plain.labels("m@v2").observe(values[0])

    def samples(registry):
        from prometheus_client import generate_latest

        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples
                if not s.name.endswith("_created")}

    got, want = samples(mine), samples(theirs)
    assert got.keys() == want.keys() and len(got) == 2 * (len(FAST) + 3)  # buckets, +Inf, _count, _sum of each model
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
