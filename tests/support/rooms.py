"""Reading the code base's imports against its room order (`proxy/rooms.py`), without importing it.

Used by `tests/app/test_rooms.py`; `python -m tests.support.rooms` prints the findings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy.rooms import APART, MODULE_SURFACE, layer_of, room_of

ROOT = Path(__file__).resolve().parents[2]
CODE = ("proxy", "policies", "guards")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    source: str  # the importing module
    target: str  # the imported module
    name: str | None  # the name taken from it (`from target import name`), None for `import target`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[Import]:
    """Every import in a file, also those inside functions and `TYPE_CHECKING` blocks."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, source, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                if room_of(target) is None and room_of(f"{target}.{alias.name}") is not None:
                    yield Import(rel, node.lineno, source, f"{target}.{alias.name}", None)  # `from proxy import workers`
                else:
                    yield Import(rel, node.lineno, source, target, alias.name)


def code_files(dirs: tuple[str, ...] = CODE) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def surface(room: str) -> frozenset[str] | None:
    """The names a package room's `__init__.py` lists in `__all__`; None for a room that is one module."""
    init = ROOT.joinpath(*room.split("."), "__init__.py")
    if not init.exists():
        return None
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def against_order(imp: Import) -> str | None:
    """Why an import runs against the room order (from a higher room or a peer), None when it does not."""
    src, dst = room_of(imp.source), room_of(imp.target)
    if src is None or dst is None or src == dst:
        return None
    if (src, dst) in APART:
        return f"{imp.file}:{imp.line}: {src} imports {imp.target} ({src} and {dst} stay apart, proxy/rooms.py APART)"
    if layer_of(dst) < layer_of(src):
        return None
    return f"{imp.file}:{imp.line}: {src} imports {imp.target} ({dst} is {'a peer' if layer_of(dst) == layer_of(src) else 'higher'})"


def past_surface(imp: Import) -> str | None:
    """Why an import enters another room other than through its surface, None when it does not."""
    src, dst = room_of(imp.source), room_of(imp.target)
    if dst is None or src == dst:
        return None
    where = f"{imp.file}:{imp.line}: {imp.target}" + (f".{imp.name}" if imp.name else "")
    if imp.name is not None and imp.name.startswith("_") or any(part.startswith("_") for part in imp.target.split(".")):
        return f"{where} is private to {dst}"
    if dst in MODULE_SURFACE:
        return None
    names = surface(dst)
    if names is None:
        return None  # a one-module room: the module is its surface
    if imp.target != dst:
        return f"{where} enters {dst} past its surface (import it from {dst})"
    if imp.name is not None and imp.name not in names:
        return f"{where} is not on the surface of {dst} (its __all__)"
    return None


def bypasses_surface(imp: Import) -> str | None:
    """A test importing a name from a room's module although the room's surface exports it."""
    dst = room_of(imp.target)
    if dst is None or dst in MODULE_SURFACE or imp.target == dst or imp.name is None:
        return None
    names = surface(dst)
    if names is None or imp.name not in names:
        return None
    return f"{imp.file}:{imp.line}: import {imp.name} from {dst}, not {imp.target}"


if __name__ == "__main__":
    for path in code_files():
        for imp in imports_of(path):
            for finding in (against_order(imp), past_surface(imp)):
                if finding:
                    print(finding)
