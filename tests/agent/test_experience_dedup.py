"""Recall skips near-duplicate lessons and fills its limit from the rest (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.experiences import Experiences
from agent.experiences.recall import near_duplicate, word_set

pytestmark = pytest.mark.anyio


def test_word_sets_fold_case_punctuation_and_plurals() -> None:
    assert word_set("Run pytest -x; stop at the FIRST failing tests!") == word_set(
        "run pytest x stop at the first failing test"
    )


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (
            "Run pytest with -x to stop at the first failing test",
            "Run pytest with -x to stop at the first failing test.",
            True,
        ),
        (
            "Run pytest with -x to stop at the first failing test",
            "run pytest with -x, to stop at the first failing tests",
            True,
        ),
        (
            "Run pytest with -x to stop at the first failing test",
            "Always run pytest with -x to stop at the first failing test",
            True,
        ),
        (
            "Run pytest with -x to stop at the first failing test",
            "Use pytest -x so the run stops at the first failure",
            False,
        ),
        ("Indent Python with tabs", "Indent Python with four spaces, never tabs", False),
        ("🙂", "🙂", True),
        ("🙂", "🙃", False),
    ],
)
def test_near_duplicate_threshold(a: str, b: str, same: bool) -> None:
    assert near_duplicate(word_set(a) or frozenset([a]), word_set(b) or frozenset([b])) is same


async def test_recall_skips_near_duplicates_and_fills_up_to_the_limit(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection(
        "a" * 32,
        "- Run pytest with -x to stop at the first failing test\n"
        "- When pytest fails on import, check the virtualenv is active",
        source="a",
    )
    await exp.append_reflection(
        "b" * 32,
        "- Run pytest with -x to stop at the first failing test.\n"
        "- run pytest with -x, to stop at the first failing tests\n"
        "- Mark slow pytest tests so the fast loop stays fast",
        source="b",
    )
    recalled = [l.text for l in await exp.recall("pytest failing test first", 3)]
    assert len(recalled) == 3
    variants = [t for t in recalled if "stop at the first failing" in t]
    assert len(variants) == 1
    assert set(recalled) - set(variants) == {
        "When pytest fails on import, check the virtualenv is active",
        "Mark slow pytest tests so the fast loop stays fast",
    }
    assert len(await exp.lessons()) == 5  # the file keeps them all: only recall skips
    exp.close()
