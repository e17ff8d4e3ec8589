"""The README is what a newcomer reads first; the reference lives in docs/ and the links hold.

Mistakes found by hand (issue 27) are pinned here so they do not come back.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from proxy.demo.local_model import CMAKE_ARGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOC_FILES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_opens_with_exactly_the_two_commands() -> None:
    first = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert first == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/thermostat demo",
        # the test extras build llama.cpp for tests/e2e, as a portable build (proxy/demo/local_model.CMAKE_ARGS says why)
        f"python3 -m venv .venv && CMAKE_ARGS=\"{CMAKE_ARGS}\" .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest -q",
    ]
    assert README.index("```bash") < README.index("\n## ")  # before anything else


@pytest.mark.parametrize("doc", [ROOT / "README.md", *DOC_FILES], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        assert dest.exists(), f"{doc.name}: link to missing {target}"
        if anchor:
            assert dest.is_file() and anchor in _anchors(dest), f"{doc.name}: no heading for #{anchor} in {dest.name}"


def test_readme_keeps_to_the_first_read_and_links_the_reference() -> None:
    for name in ("configuration", "control-api", "metrics", "security", "benchmarks"):
        assert f"(docs/{name}.md)" in README
    assert "| section | keys |" not in README  # the configuration table lives in docs/configuration.md
    assert len(README.splitlines()) < 300  # was 840 before the reference moved to docs/
    for heading in ("## Try it", "## Point a real client at it", "## What Thermostat guarantees"):
        assert heading in README


@pytest.mark.parametrize("wrong", [
    "OpenAI-compatible LLM APIs",  # Anthropic's Messages format is served too
    '"Security (admin)"',  # no such section
    "reopening exploration is not wired yet",  # it is (proxy/decision/conservative.py)
    "only `temperature` and `max_tokens` (or",  # effort and max_output_tokens change too
    "within minutes the dashboard",  # not measured as such
])
def test_mistakes_found_by_hand_stay_fixed(wrong: str) -> None:
    for doc in (ROOT / "README.md", *DOC_FILES):
        assert wrong not in doc.read_text(), f"{doc.name}: {wrong}"


def test_the_package_and_the_command_line_name_both_formats() -> None:
    """What `pip show thermostat` and `thermostat --help` say: the Anthropic format is served too."""
    from proxy.cli import build_parser

    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    for text in (description, build_parser().description or ""):
        assert "OpenAI-compatible" not in text and "Anthropic" in text, text


def test_the_anthropic_snippet_passes_an_api_key() -> None:
    """The SDK refuses to build a client without one (or ANTHROPIC_API_KEY)."""
    snippet = README.split("import anthropic", 1)[1].split("```", 1)[0]
    assert "api_key=" in snippet


def test_test_command_says_what_ci_needs() -> None:
    intro = README.split("## ", 1)[0]
    assert "promtool" in intro and "Chromium" in intro and "CI=true" in intro


def test_alert_rules_name_a_test_file_that_exists() -> None:
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    named = re.findall(r"tests/\S+\.py", rules)
    assert named
    for path in named:
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("doc", [ROOT / "README.md", *DOC_FILES], ids=lambda p: p.name)
def test_named_test_and_bench_files_exist(doc: Path) -> None:
    for path in re.findall(r"`((?:tests|bench)/[\w/.-]+\.(?:py|md|png))`", doc.read_text()):
        assert (ROOT / path).exists(), f"{doc.name} names {path}"
