"""How many byot modules a module imports, and the longest chain of module-level imports inside byot.

    python experiments/import_graph.py [CHECKOUT] [MODULE]      # defaults: this checkout, byot.training.fit

Reads the source (nothing is imported or run): an import inside a function counts for the first figure, only
module-level imports make the chain, and a chain never visits a module twice. Run it on an older checkout
(``git worktree add /tmp/old COMMIT``) to compare, e.g. ``byot.engine.fit`` before the engine was split.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


def _modules(src: Path) -> dict[str, Path]:
    found = {}
    for path in src.rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(modules: dict[str, Path], name: str, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(modules[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("byot"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("byot")}
    return {m for m in found if m in modules and m != name}


def main(checkout: Path, module: str) -> None:
    modules = _modules(checkout / "src")

    @functools.cache
    def longest(name: str, seen: frozenset[str]) -> tuple[str, ...]:
        chains = [longest(d, seen | {name}) for d in imports(modules, name, True) if d not in seen]
        return (name, *max(chains, key=len, default=()))

    print(f"byot modules imported by {module}: {len(imports(modules, module))}")
    chain = max((longest(m, frozenset()) for m in modules), key=len)
    print(f"longest chain of module-level imports: {len(chain)} modules: {' -> '.join(chain)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1],
         sys.argv[2] if len(sys.argv) > 2 else "byot.training.fit")
