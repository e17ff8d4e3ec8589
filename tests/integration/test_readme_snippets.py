"""The README's snippets, run as a newcomer would: against `thermostat demo`, with the
official clients, as written (only the port is moved to a free one).

Keeps the commands and code of README.md (and the feedback example of
docs/control-api.md) true: a snippet that stops working fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.support.servers import free_port, stop_process, wait_ready

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOKEN = "readme-snippets-token-0123456789"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _on(port: int, text: str) -> str:
    return text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """`thermostat demo` as the README's first command starts it, from a directory holding config.toml."""
    cwd = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "config.toml", cwd / "config.toml")
    port = free_port()
    env = {**os.environ, "THERMOSTAT_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("ANTHROPIC_API_KEY", None)  # the snippet must work without it
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--simulator-port", str(free_port()),
                             "--traffic", "0"], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/readiness", proc)
        yield port, cwd
    finally:
        stop_process(proc)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")}
    env["THERMOSTAT_ADMIN_TOKEN"] = TOKEN
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_the_curl_of_try_it(demo: tuple[int, Path]) -> None:
    port, cwd = demo
    (try_it,) = [b for b in blocks(README, "bash") if "curl" in b]
    curl = "\n".join(line for line in try_it.splitlines() if "thermostat demo" not in line)  # the demo already runs
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is needed to run the README's curl")
        pytest.skip("curl not installed")
    out = subprocess.run(["bash", "-c", _on(port, curl)], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200") and "x-thermostat-mode:" in out.stdout and '"choices"' in out.stdout


def test_the_openai_snippet(demo: tuple[int, Path]) -> None:
    port, cwd = demo
    (snippet,) = [b for b in blocks(README, "python") if "from openai import OpenAI" in b]
    code = _on(port, snippet) + "\nassert completion.choices[0].message.content and completion._request_id\nassert response.output_text\n"
    out = _python(code, cwd)
    assert out.returncode == 0, out.stderr


def test_the_anthropic_snippet_without_anthropic_api_key(demo: tuple[int, Path]) -> None:
    port, cwd = demo
    (snippet,) = [b for b in blocks(README, "python") if "import anthropic" in b]
    out = _python(_on(port, snippet), cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the snippet prints the answer


def test_the_feedback_example_of_the_control_api(demo: tuple[int, Path]) -> None:
    port, cwd = demo
    (snippet,) = blocks((ROOT / "docs" / "control-api.md").read_text(), "python")
    code = _on(port, snippet).replace("httpx.post(", "r = httpx.post(", 1) + "\nassert r.status_code == 200, r.text\n"
    out = _python(code, cwd)
    assert out.returncode == 0, out.stderr


def test_the_evaluate_command(demo: tuple[int, Path]) -> None:
    """After some traffic, from the demo's directory, as the README writes it."""
    port, cwd = demo
    (snippet,) = [b for b in blocks(README, "python") if "from openai import OpenAI" in b]
    for _ in range(3):
        assert _python(_on(port, snippet), cwd).returncode == 0
    (command,) = [b.strip() for b in blocks(README, "bash") if "thermostat evaluate" in b]
    first = command.split(" && ")[0]
    assert shlex.split(first)[0] == ".venv/bin/thermostat"  # the console script is proxy.cli:main
    out = subprocess.run([sys.executable, "-m", "proxy.cli", *shlex.split(first)[1:]], capture_output=True, text=True, timeout=300,
                         cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert (cwd / "eval" / "report.md").read_text().startswith("# Offline evaluation")
