"""The codebase's shape, kept as tests: shallow one-way layers and short functions
(issue 22's targets), measured on the source with ``ast`` (nothing is imported)."""

import ast
import functools
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "dae_jax"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The dae_jax modules a module imports when it is imported (module-level statements,
    conditional ones included; ``TYPE_CHECKING`` blocks and imports inside functions,
    which run on use, are not)."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module:
                named = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                out.update(named or ({node.module} & set(modules)))

    visit(ast.parse(path.read_text()).body)
    return out


def longest_import_chain() -> list[str]:
    modules = _modules()
    imports = {name: _imports(path, modules) - {name} for name, path in modules.items()}

    @functools.cache
    def chain(name: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        longer = [chain(d, seen | {name}) for d in imports[name] if d not in seen | {name}]
        longer.sort(key=lambda c: -len(c))
        return (name, *(longer[0] if longer else ()))

    chains = sorted((chain(name) for name in modules), key=lambda c: -len(c))
    return list(chains[0])


def test_the_longest_import_chain_is_eight_modules_or_fewer():
    found = longest_import_chain()
    assert 4 <= len(found) <= 8, " -> ".join(found)


def test_no_function_in_dae_jax_is_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
