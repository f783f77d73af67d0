"""The import graph of `service/`, read from the source (every import, a function's own included): no circle,
no stage importing a later one, Prometheus only in metrics.py, and torch only where the full install is needed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ..server import ROOT

SERVICE = ROOT / "service"
# Each package may import the ones before it and not those after (the README's data flow). The model is
# what training writes and serving reads: it imports neither; the serving path never imports training.
SERVING = ("service.engine", "service.sessions", "service.api", "service.metrics", "service.server")
LATER = {
    "service.model": ("service.training", "service.backends", *SERVING, "service.cli"),
    "service.training": (*SERVING, "service.cli"),
    "service.backends": ("service.training", *SERVING, "service.cli"),
    "service.engine": ("service.training", *SERVING[1:], "service.cli"),
    "service.sessions": ("service.training", *SERVING[2:], "service.cli"),
    "service.api": ("service.training", *SERVING[3:], "service.cli"),
}
TORCH_ALLOWED = {"service.model.network", "service.backends.torch_fp32", "service.backends.torch_int8", "service.backends.cuda"}
TORCH_PACKAGES = ("service.training.",)  # the offline side: the full install, all of it


def modules() -> dict[str, Path]:
    out = {}
    for path in SERVICE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = modules()


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement of a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, node.lineno, id(node) in top))
    return out


def test_no_import_circle():
    edges = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("package", sorted(LATER))
def test_no_stage_imports_a_later_one(package):
    wrong = [f"{m}:{line} imports {t}" for m in MODULES if m == package or m.startswith(package + ".")
             for t, line, _ in imports(m) if any(t == later or t.startswith(later + ".") for later in LATER[package])]
    assert not wrong, wrong


BUILT_BY_THE_ROOT = ("service.backends", "service.sessions.memory_store", "service.sessions.redis_store", "service.metrics")


def test_only_the_composition_root_builds_the_services():
    """The HTTP layer serves with what service/server.py builds: it never reaches a backend, a concrete
    session store or the metrics itself, and it constructs no pool, engine or session calls."""
    wrong = [f"{m}:{line} imports {t}" for m in MODULES if m.startswith("service.api")
             for t, line, _ in imports(m) if any(t == b or t.startswith(b + ".") for b in BUILT_BY_THE_ROOT)]
    for m in MODULES:
        if m.startswith("service.api"):
            tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
            wrong += [f"{m}:{node.lineno} builds {node.func.id}" for node in ast.walk(tree) if isinstance(node, ast.Call)
                      and isinstance(node.func, ast.Name) and node.func.id in ("ModelPool", "Engine", "SessionCalls", "Catalog")]
    assert not wrong, wrong


def test_the_engine_reaches_a_backend_only_through_its_interface():
    """The engine steps whatever backend it is handed, the CUDA one included (its rows on the device are the
    backend's `Decoder`): it imports `backends.base` and no backend of its own choosing."""
    wrong = [f"{m}:{line} imports {t}" for m in MODULES if m.startswith("service.engine")
             for t, line, _ in imports(m) if t.startswith("service.backends") and t != "service.backends.base"]
    assert not wrong, wrong


def test_only_the_settings_read_the_environment():
    """One source for each setting: the server's `Settings`, the command line's --store default, and the
    root's warning about variables no setting reads. Nothing else reads os.environ."""
    readers = sorted(m for m, path in MODULES.items() if "os.environ" in path.read_text(encoding="utf-8")
                     or "getenv(" in path.read_text(encoding="utf-8"))
    assert readers == ["service.cli.common", "service.server"], readers  # settings.py: pydantic-settings reads it


def test_only_the_metrics_module_talks_to_prometheus():
    users = sorted({m for m in MODULES for t, _, _ in imports(m) if t.split(".")[0] == "prometheus_client"})
    assert users == ["service.metrics"]


def test_torch_stays_out_of_the_serving_path():
    """At module level, torch is imported only by the modules of the full install; the serving path
    (tests/http/test_serving_install.py runs it without torch) imports it nowhere."""
    wrong = [f"{m}:{line}" for m in MODULES if m not in TORCH_ALLOWED and not m.startswith(TORCH_PACKAGES)
             for t, line, top in imports(m) if t.split(".")[0] == "torch" and top]
    assert not wrong, wrong


def test_the_readme_settings_table_is_the_settings():
    from service.settings import settings_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    copy = readme.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert copy == settings_table(), "README's settings table is stale: paste `python -m service.settings` into it"


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles():
    from service.settings import unknown_variables

    found = unknown_variables({"CHARLSTM_MAX_BATCH_SIZ": "8", "CHARLSTM_PORT": "1", "HOME": "/", "CHARLSTM_ZZZ": "1"})
    assert found == ["CHARLSTM_MAX_BATCH_SIZ (did you mean CHARLSTM_MAX_BATCH_SIZE?)", "CHARLSTM_ZZZ"]


def test_an_event_is_a_method_of_its_protocol_and_a_failing_observer_is_logged(caplog):
    from service.engine.engine import EngineStats
    from service.engine.observers import Fanout

    heard = []

    class Counts:
        def on_step(self, rows, seconds, steps=1):
            heard.append(rows)

    class Broken:
        def on_step(self, rows, seconds, steps=1):
            raise RuntimeError("a broken observer")

    events = Fanout(EngineStats, [Broken(), Counts()])
    events.on_step(3, 0.1)
    assert heard == [3] and "Broken.on_step failed" in caplog.text
    with pytest.raises(AttributeError, match="on_stpe"):
        events.on_stpe(3, 0.1)  # a misspelt event fails where it is called
