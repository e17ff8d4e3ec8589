"""The documented configuration matches the code: config.toml and the reference's table, both ways.

Every key shown in config.toml (commented examples included) and every key named in the
configuration table of docs/configuration.md must exist in the config structs; every struct
field must be named in that table's row for its section; and the values config.toml shows (outside the
upstream examples) are the defaults, as its header says.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proxy.config import Config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
CONFIG_TOML = (ROOT / "config.toml").read_text()


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    """The struct inside Optional / tuple[...] / dict[str, ...], else None."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    for arg in typing.get_args(tp):
        found = _struct_of(arg)
        if found is not None:
            return found
    return None


def _resolve(path: list[str]) -> type[msgspec.Struct]:
    """The struct behind a section path such as ['upstreams', 'models_config'] or ['baseline', '<task>']."""
    struct: type[msgspec.Struct] = Config
    for part in path:
        if part.startswith("<"):  # a dict entry: the struct is already the value type
            continue
        hints = typing.get_type_hints(struct)
        assert part in hints, f"section part {part!r} is not a field of {struct.__name__}"
        sub = _struct_of(hints[part])
        assert sub is not None, f"{part!r} in {struct.__name__} is not a section"
        struct = sub
    return struct


def _sections(struct: type[msgspec.Struct] = Config, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], type[msgspec.Struct]]:
    """Every struct reachable from Config, by section path (dict entries named '<task>')."""
    out: dict[tuple[str, ...], type[msgspec.Struct]] = {prefix: struct}
    for name, tp in typing.get_type_hints(struct).items():
        sub = _struct_of(tp)
        if sub is not None:
            path = (*prefix, name, "<task>") if typing.get_origin(tp) is dict else (*prefix, name)
            out.update(_sections(sub, path))
    return out


def _scalar_fields(struct: type[msgspec.Struct]) -> set[str]:
    hints = typing.get_type_hints(struct)
    return {name for name in struct.__struct_fields__ if _struct_of(hints[name]) is None}


def readme_table() -> dict[tuple[str, ...], set[str]]:
    """Section path -> keys named in the configuration table of docs/configuration.md."""
    block = CONFIG_DOC.split("| section | keys |", 1)[1].split("\n\n", 1)[0]
    rows: dict[tuple[str, ...], set[str]] = {}
    for line in block.splitlines()[2:]:
        cells = line.split(" | ")
        assert len(cells) == 2, f"config reference row with an unexpected shape: {line[:80]}"
        sections = re.findall(r"`\[\[?([^\]`]+)\]\]?`", cells[0])
        assert len(sections) == 1, f"one section per config reference row: {cells[0]}"
        path = tuple(sections[0].split("."))
        assert path not in rows, f"section {sections[0]} has two rows"
        # Keys: backticked identifiers, not parenthesised defaults (`(thermostat)`) nor metric names.
        keys = {k for k in re.findall(r"(?<!\()`([a-z][a-z0-9_]*)`", cells[1]) if not k.startswith("thermostat_")}
        rows[path] = keys
        for dotted in re.findall(r"`([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+)`", cells[1]):  # cross-references such as `server.data_dir`
            *section, key = dotted.split(".")
            assert key in _resolve(section).__struct_fields__, f"docs/configuration.md [{sections[0]}] refers to unknown key {dotted}"
    return rows


def toml_keys() -> list[tuple[tuple[str, ...], str, str]]:
    """(section path, key, line) for every key config.toml shows, commented examples included."""
    section: tuple[str, ...] = ()
    out = []
    for line in CONFIG_TOML.splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z_.]+)\]\]?", line)
        if header:
            parts = header.group(1).split(".")
            section = ("baseline", "<task>") if parts[0] == "baseline" else tuple(parts)
            continue
        key = re.match(r"^#?\s*([a-z][a-z0-9_]*)\s*=", line)
        if key:
            out.append((section, key.group(1), line))
    return out


def test_every_readme_key_exists_and_every_field_is_documented() -> None:
    rows = readme_table()
    sections = _sections()
    for path, keys in rows.items():
        struct = _resolve(list(path))
        unknown = keys - set(struct.__struct_fields__)
        assert not unknown, f"docs/configuration.md [{'.'.join(path)}] names keys the config does not have: {sorted(unknown)}"
    for path, struct in sections.items():
        scalars = _scalar_fields(struct)
        if not scalars:  # only sub-sections (Config itself, [policy])
            continue
        assert path in rows, f"no docs/configuration.md row for [{'.'.join(path)}]"
        missing = scalars - rows[path]
        assert not missing, f"docs/configuration.md [{'.'.join(path)}] does not document {sorted(missing)}"
        for name in set(struct.__struct_fields__) - scalars:  # sub-sections: a row of their own
            assert (*path, name) in sections and (*path, name) in rows or (*path, name, "<task>") in rows, name


def test_every_config_toml_key_exists() -> None:
    shown = toml_keys()
    assert len(shown) > 50
    for section, key, line in shown:
        assert key in _resolve(list(section)).__struct_fields__, f"config.toml shows an unknown key: {line.strip()}"


def test_config_toml_shows_the_defaults() -> None:
    """Its header says shown values are the defaults unless marked "example" (upstreams are examples)."""
    doc = tomllib.loads(CONFIG_TOML)
    defaults = msgspec.json.decode(msgspec.json.encode(Config()))
    for section, key, line in toml_keys():
        if line.startswith("#") or "example" in line or section[0] in ("upstreams", "baseline"):
            continue
        shown: Any = doc
        default: Any = defaults
        for part in (*section, key):
            shown, default = shown[part], default[part]
        assert shown == default, f"config.toml shows {line.strip()!r}, the default is {default!r}"


@pytest.mark.parametrize("text", ["code down toward 0.2", "proxy/upstream", "+ ADMIN_TOKEN"])
def test_readme_claims_fixed(text: str) -> None:
    """Claims found wrong by hand: the demo's code band stops at 0.5; there is no proxy/upstream."""
    assert text not in DOCS
