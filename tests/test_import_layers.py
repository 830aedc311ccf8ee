"""Imports between the parts of ``src/fedmoa`` run one way: no package-level cycle.

A cycle (``eval`` importing ``federation`` while ``federation`` imports ``eval``) works only as
long as one side imports inside functions, and it makes each part impossible to read or reuse
without the other. Every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedmoa"


def part_of(module: str) -> str:
    """``fedmoa.federation.client`` → ``federation``; ``fedmoa.config`` → ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedmoa"


def imports(path: Path) -> Iterator[str]:
    """The ``fedmoa`` modules a file imports, wherever the import statement stands."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        yield from (name for name in names if name.split(".")[0] == "fedmoa")


def import_graph(root: Path) -> dict[str, dict[str, list[str]]]:
    """part → part it imports → the files that do it."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        source = part_of(".".join(p for p in parts if p != "__init__"))
        for module in imports(path):
            target = part_of(module)
            if target != source:
                graph.setdefault(source, {}).setdefault(target, []).append(path.name)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every strongly connected group of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_the_parts_of_fedmoa_import_each_other_one_way() -> None:
    graph = import_graph(PACKAGE)
    assert {"eval", "federation", "rewards", "grpo"} <= set(graph)  # the parse sees the tree
    found = cycles(graph)
    detail = [
        f"{a} -> {b} ({', '.join(sorted(set(graph[a][b])))})"
        for group in found
        for a in group
        for b in group
        if b in graph.get(a, {})
    ]
    assert not found, f"import cycles between parts of fedmoa: {detail}"


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    root = tmp_path / "fedmoa"
    for part, text in {
        "eval/harness.py": "def f():\n    from fedmoa.federation.client import x\n",
        "federation/client.py": "from fedmoa.eval import evaluate_rows\n",
        "data/rows.py": "import fedmoa.errors\n",
    }.items():
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).write_text(text)
    assert cycles(import_graph(root)) == [["eval", "federation"]]
