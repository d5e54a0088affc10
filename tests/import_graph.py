"""Reading imports from source, for the layout tests (test_layout.py, test_layers.py): every import counts, at
the top, inside functions (lazy) and under TYPE_CHECKING."""

from __future__ import annotations

import ast


def import_statements(source: str, package: str = "") -> list[tuple[str, str | None]]:
    """(module, name) for every import in a source, relative imports resolved against ``package``: ``import a.b``
    gives (a.b, None), ``from a import b`` gives (a, b)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found
