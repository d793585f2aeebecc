"""The architecture as the code states it: which package may import which, read from the imports themselves (ast).

    cli  →  service, rpc  →  train, evaluate, encode, plan  →  model, data, store, config  →  errors

A package imports packages of a lower layer, or of its own layer as long as the packages' graph has no cycle.
``shared`` never imports a service; the services never import each other; only entry points import ``shared.cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: dict[str, int] = {
    "errors": 0,
    "logs": 0,
    "deadline": 0,
    "config": 1,
    "store": 1,
    "data": 1,
    "model": 1,
    "encode": 2,
    "train": 2,
    "evaluate": 2,
    "plan": 2,
    "service": 3,
    "rpc": 3,
    "cli": 4,
}
SERVICES = ("encoder_svc", "trainer_svc", "eval_svc")
# Lines as `ruff format` writes them: a call that wraps takes one line per argument (about a fifth more lines than
# hand-wrapped code, whose limit was 500).
MAX_LINES = 600


def modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "_pb2" not in p.name)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts) if path.is_relative_to(ROOT) else [path.stem]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (top level, in functions, under TYPE_CHECKING): for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (c may be a module); relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def component(module: str) -> str | None:
    """``shared.train.trainer`` → ``train``; ``shared.errors`` → ``errors``; ``shared`` itself → None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "shared" and len(parts) > 1 else None


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in modules("shared"):
        src = component(module_name(path))
        if src is None:
            continue
        for mod in imported(path):
            dst = component(mod)
            if dst is not None and dst in LAYERS and dst != src:
                edges.setdefault(src, set()).add(dst)
    return edges


def test_every_component_is_a_known_package_with_a_docstring_saying_what_it_may_import():
    found = {p.name for p in (ROOT / "shared").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in (ROOT / "shared").glob("*.py") if p.stem != "__init__"}
    assert found == set(LAYERS), "a new top-level module or package of shared/ needs a layer in LAYERS"
    for name in LAYERS:
        init = ROOT / "shared" / name / "__init__.py"
        if init.exists():
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            assert doc and "May import" in doc, f"shared/{name}/__init__.py must say what it owns and may import"


def test_imports_point_down_the_layers():
    wrong = []
    for path in modules("shared"):
        src = component(module_name(path))
        for mod in sorted(imported(path)):
            dst = component(mod)
            if src is not None and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
                wrong.append(
                    f"{path.relative_to(ROOT)} ({src}, layer {LAYERS[src]}) imports {mod} ({dst}, layer {LAYERS[dst]})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_packages():
    edges = package_edges()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("packages import each other: " + " → ".join(trail[trail.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_detector_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above would pass on an empty graph: make sure the readers find real edges."""
    edges = package_edges()
    assert {"model", "config"} <= edges["encode"] and "store" in edges["train"] and "rpc" in edges["service"]
    mod = tmp_path / "m.py"
    mod.write_text("from shared.cli.main import main\n\ndef f():\n    from shared.train import runner\n")
    assert {"shared.cli.main", "shared.cli.main.main", "shared.train", "shared.train.runner"} <= imported(mod)


def test_shared_never_imports_a_service_and_services_never_import_each_other():
    wrong = []
    for path in modules("shared"):
        wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in imported(path) if m.split(".")[0] in SERVICES]
    for svc in SERVICES:
        for path in modules(svc):
            wrong += [
                f"{path.relative_to(ROOT)} imports {m}"
                for m in imported(path)
                if m.split(".")[0] in SERVICES and m.split(".")[0] != svc
            ]
    assert not wrong, "\n".join(wrong)


def test_only_entry_points_import_the_cli():
    wrong = []
    for top in ("shared", *SERVICES, "bench"):
        for path in modules(top):
            if module_name(path).startswith("shared.cli"):
                continue
            wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in imported(path) if component(m) == "cli"]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_the_line_limit():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for top in ("shared", *SERVICES, "bench")
        for p in modules(top)
    }
    over = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them along responsibilities): {over}"


def test_the_tests_mirror_the_packages():
    """tests/<name>/ holds the tests of shared/<name>/ (tests/deploy/ those of deploy/ and compose.yaml); only the
    layering's own test and the shared helpers sit at the top."""
    folders = {d.name for d in (ROOT / "tests").iterdir() if d.is_dir() and d.name not in ("fixtures", "__pycache__")}
    assert folders <= set(LAYERS) | {"deploy"}, folders - set(LAYERS)
    assert [p.name for p in (ROOT / "tests").glob("test_*.py")] == ["test_layout.py"]


def test_processes_are_started_through_an_import():
    """A module run as ``python -m NAME`` is named by importing it (``shared.service.worker.COMMAND``), never by a
    string the import graph above cannot see: ``[..., "-m", "some.module", ...]`` in the code is an error."""
    wrong = []
    for top in ("shared", *SERVICES):
        for path in modules(top):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.List | ast.Tuple):
                    values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                    for flag, name in zip(values, values[1:], strict=False):
                        if flag == "-m" and isinstance(name, str) and name.split(".")[0] in ("shared", *SERVICES):
                            wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} starts {name} by name")
    assert not wrong, "\n".join(wrong)
