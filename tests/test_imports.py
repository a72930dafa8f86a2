"""No import cycle between the site's two halves of a round: `fedlora.apps.client` (plain rounds
and the ClientApp) and `fedlora.apps.secure` (secure rounds) share the site's training through
`fedlora.apps.contribution`. The secure side never imports the client side, and no import of
one by the other hides inside a function (the usual way a cycle is dodged)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedlora"
CLIENT, SECURE = "fedlora.apps.client", "fedlora.apps.secure"


def module_path(name: str) -> Path:
    return PACKAGE.parent / (name.replace(".", "/") + ".py")


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import in module `name`'s source; a
    `from a import b` counts as importing both a and a.b (b may be a module)."""
    tree = ast.parse(module_path(name).read_text(), filename=str(module_path(name)))
    package = name.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against this module's package
                    parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                found.append((base, inside))
                found.extend((f"{base}.{alias.name}", inside) for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


def test_the_secure_side_never_imports_the_client_side():
    assert [m for m, _ in imports(SECURE) if m == CLIENT] == []
    # and what both need comes from a module that imports neither
    shared = {m for m, _ in imports("fedlora.apps.contribution")}
    assert CLIENT not in shared and SECURE not in shared


def test_neither_imports_the_other_inside_a_function():
    for name, other in ((CLIENT, SECURE), (SECURE, CLIENT)):
        hidden = [m for m, inside in imports(name) if inside and m == other]
        assert hidden == [], f"{name} imports {other} inside a function"


@pytest.mark.parametrize("first, other", [(CLIENT, SECURE), (SECURE, CLIENT)])
def test_each_imports_first_in_a_fresh_interpreter(first, other):
    code = (
        "import sys\n"
        f"import {first}\n"
        f"loaded = {other!r} in sys.modules\n"
        f"import {other}\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # the client side registers the secure stages (it imports secure); secure loads no client
    assert done.stdout.strip() == str(first == CLIENT)
