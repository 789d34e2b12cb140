"""The house rules of the package (docs/architecture.md): folders stacked in floors, each importing
only from the floors below it (or its own), no import circle between modules, no private name used
across modules, no module longer than MAX_LINES. Read from the source with ``ast``: nothing is imported."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "backtrack_sampler"
MAX_LINES = 450
# Each room and the rooms it may import from (a module at the top, like errors.py, is a room of its own
# that imports no other room). The package's __init__ is the public facade over all of them.
FLOORS = ["errors", "quality", "provider", "strategy", "core", "engine", "server", "cli"]
LEAVES = {"errors", "quality", "_moved"}  # top-level modules that import nothing of the package


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(name: str, path: pathlib.Path):
    """(module imported, names taken from it, line) for every import of the package in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports name types for hints; nothing is imported when the code runs
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "backtrack_sampler":
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "backtrack_sampler":
                    yield alias.name, [], node.lineno


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = dict(_modules())


def test_every_room_imports_only_from_the_floors_below():
    wrong = []
    for name, path in MODULES.items():
        room = _room(name)
        if not room:  # the package's facade
            continue
        for target, _, line in _imports(name, path):
            other = _room(target)
            if other == room or target == "backtrack_sampler":  # its own room, or `from .. import __version__`
                continue
            if room in LEAVES:
                wrong.append(f"{path.name}:{line} {name} -> {target} (a leaf imports nothing of the package)")
            elif other not in LEAVES and FLOORS.index(other) > FLOORS.index(room):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} {room} -> {other} ({target}) climbs up")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, _ in _imports(name, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in graph and candidate != name:
                    graph[name].add(candidate)
                    break
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt == "backtrack_sampler" or nxt.endswith("__init__"):
                continue
            if state.get(nxt) == "open":
                cycle.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node != "backtrack_sampler":
            visit(node, [node])
    assert not cycle, "\n".join(cycle)


def test_no_private_name_crosses_modules():
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line} imports {n} from {target}"
        for name, path in MODULES.items()
        for target, names, line in _imports(name, path)
        for n in names
        if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in MODULES
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}: split it by job)"
