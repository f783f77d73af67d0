"""deploy/kubernetes/ validates offline against the Kubernetes schemas (kubernetes-validate, strict:
unknown fields fail), and holds what the scaled deployment needs."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind() -> dict[str, dict]:
    return {d["kind"]: d for _, d in documents() if d["kind"] != "Service" or d["metadata"]["name"] == "charlstm"}


@pytest.mark.parametrize("name,doc", documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_manifest_is_valid_for_kubernetes(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_an_unknown_field_is_caught():
    doc = dict(by_kind()["Deployment"], specification={})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_deployment_probes_drains_and_shares_sessions():
    kinds = by_kind()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "Secret"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container["env"]}
    assert env["CHARLSTM_SESSION_STORE"]["value"].startswith("redis://")
    secret = kinds["Secret"]
    for name, key in (("CHARLSTM_SESSION_KEY", "session-key"), ("CHARLSTM_API_KEY", "api-key"), ("REDIS_PASSWORD", "redis-password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["stringData"]
    assert "$(REDIS_PASSWORD)@" in env["CHARLSTM_SESSION_STORE"]["value"]  # closed by default: the service sends the password
    grace = float(env["CHARLSTM_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > grace + 5 + 5  # the drain, uvicorn's close and the preStop wait
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    redis = kinds["StatefulSet"]["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"] and "--appendonly" in args
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # Redis takes no client without it
    redis_env = {e["name"]: e for e in redis["template"]["spec"]["containers"][0]["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
