"""The package's layout holds: no import cycles, the worker never imports the producer, the contract and
the producer never import torch."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"jobs": "batchgen.jobs", "producer": "batchgen.producer", "worker": "batchgen.worker"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every batchgen module -> the batchgen modules it imports (at any depth in the file, lazy ones too)."""
    modules = {_module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchgen"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("batchgen"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def imports_torch(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "torch" or n.startswith("torch.") for n in names):
            return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_worker_never_imports_the_producer():
    offenders = {m: sorted(t for t in ts if t.startswith("batchgen.producer"))
                 for m, ts in import_graph().items() if m.startswith("batchgen.worker")}
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def test_the_contract_only_imports_itself():
    graph = import_graph()
    assert {m: sorted(ts) for m, ts in graph.items()
            if m.startswith("batchgen.jobs") and any(not t.startswith("batchgen.jobs") for t in ts)} == {}


@pytest.mark.parametrize("top", ["jobs", "producer"])
def test_contract_and_producer_never_import_torch(top):
    assert [str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*.py") if imports_torch(p)] == []


def test_the_engine_never_imports_the_queue_side():
    graph = import_graph()
    queue_side = {"batchgen.worker.worker", "batchgen.worker.reaper", "batchgen.worker.launcher",
                  "batchgen.worker.local_run", "batchgen.worker.result_files", "batchgen.worker.factory"}
    assert {m: sorted(graph[m] & queue_side) for m in graph
            if m.startswith(("batchgen.worker.engine", "batchgen.worker.offload")) and graph[m] & queue_side} == {}
