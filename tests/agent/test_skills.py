"""Skills: loading SKILL.md folders, building the system prompt, and the load_skill tool."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.errors import ToolCallError
from agent.skills import (
    BASE_SYSTEM_PROMPT,
    LoadSkillTool,
    build_system_prompt,
    load_skills,
    read_skills,
    skills_system_prompt,
)
from agent.tools.registry import Tool


def write_skill(root: Path, folder: str, text: str) -> Path:
    path = root / folder / "SKILL.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


PDF_SKILL = """---
name: pdf-forms
description: >
  Fill in PDF forms
  from structured data.
---

# PDF forms

1. Read the form fields.
2. Fill them in.
"""

CSV_SKILL = "---\nname: csv\ndescription: Clean up CSV files.\nlicense: MIT\n---\nUse the csv module.\n"


@pytest.fixture
def skills_dir(tmp_path: Path) -> Path:
    root = tmp_path / "skills"
    write_skill(root, "pdf-forms", PDF_SKILL)
    write_skill(root, "csv", CSV_SKILL)
    return root


def test_skills_are_loaded_with_name_description_and_body(skills_dir: Path) -> None:
    skills = load_skills(skills_dir)
    assert [(s.name, s.description) for s in skills] == [
        ("csv", "Clean up CSV files."),
        ("pdf-forms", "Fill in PDF forms from structured data."),
    ]
    assert skills[1].body == "# PDF forms\n\n1. Read the form fields.\n2. Fill them in."


def test_prompt_lists_skills_and_points_to_load_skill(skills_dir: Path) -> None:
    prompt = build_system_prompt(load_skills(skills_dir))
    assert prompt.startswith(BASE_SYSTEM_PROMPT)
    assert "## Skills" in prompt and "load_skill" in prompt
    assert "- csv: Clean up CSV files." in prompt
    assert "- pdf-forms: Fill in PDF forms from structured data." in prompt
    assert "Read the form fields" not in prompt  # only the listing, not the full text
    assert build_system_prompt([]) == BASE_SYSTEM_PROMPT
    assert build_system_prompt([], base="Be brief.") == "Be brief."


def test_missing_skills_dir_means_no_skills(tmp_path: Path) -> None:
    assert load_skills(tmp_path / "nope") == []
    assert load_skills(None) == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("# No front matter\n", "front matter"),
        ("---\nname: x\ndescription: y\n", "closing"),
        ("---\nname: [unclosed\n---\n", "not valid YAML"),
        ("---\n- a list\n---\n", "mapping"),
        ("---\nname: lonely\n---\nbody\n", "description"),
        ("---\nname: ''\ndescription: empty name\n---\n", "name"),
        ("---\nname: 3\ndescription: not a string name\n---\n", "name"),
    ],
)
def test_malformed_skills_are_skipped_with_a_warning_naming_the_file(
    skills_dir: Path, caplog: pytest.LogCaptureFixture, text: str, reason: str
) -> None:
    bad = write_skill(skills_dir, "broken", text)
    with caplog.at_level(logging.WARNING, logger="agent.skills"):
        skills = load_skills(skills_dir)
    assert [s.name for s in skills] == ["csv", "pdf-forms"]
    assert str(bad) in caplog.text and reason in caplog.text


def test_folders_without_skill_md_and_duplicate_names(
    skills_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (skills_dir / "empty-folder").mkdir()
    (skills_dir / "notes.txt").write_text("not a skill")
    duplicate = write_skill(skills_dir, "zz-copy", CSV_SKILL)
    with caplog.at_level(logging.WARNING, logger="agent.skills"):
        assert [s.name for s in load_skills(skills_dir)] == ["csv", "pdf-forms"]
    assert str(duplicate) in caplog.text


@pytest.mark.anyio
async def test_skills_are_read_fresh_each_time(skills_dir: Path) -> None:
    assert "- csv:" in await skills_system_prompt(skills_dir)
    write_skill(skills_dir, "csv", CSV_SKILL.replace("Clean up CSV files.", "Tidy CSV files."))
    prompt = await skills_system_prompt(skills_dir)
    assert "- csv: Tidy CSV files." in prompt
    assert [s.name for s in await read_skills(skills_dir)] == ["csv", "pdf-forms"]


@pytest.mark.anyio
async def test_load_skill_returns_the_full_text(skills_dir: Path) -> None:
    tool = LoadSkillTool(skills_dir, await read_skills(skills_dir))
    assert isinstance(tool, Tool)
    assert (tool.name, tool.group) == ("load_skill", None)
    assert tool.input_schema["required"] == ["name"]
    assert tool.input_schema["properties"]["name"]["enum"] == ["csv", "pdf-forms"]

    assert (
        await tool.call({"name": "pdf-forms"}) == "# PDF forms\n\n1. Read the form fields.\n2. Fill them in."
    )
    write_skill(skills_dir, "csv", CSV_SKILL.replace("Use the csv module.", "Use pandas."))
    assert await tool.call({"name": "csv"}) == "Use pandas."  # edits are served at once


@pytest.mark.anyio
async def test_load_skill_unknown_name_lists_the_available_ones(skills_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ToolCallError) as info:
        await LoadSkillTool(skills_dir).call({"name": "excel"})
    assert "'excel'" in str(info.value) and "csv, pdf-forms" in str(info.value)

    empty = LoadSkillTool(tmp_path / "none")
    assert "enum" not in empty.input_schema["properties"]["name"]
    with pytest.raises(ToolCallError, match="Available skills: none"):
        await empty.call({"name": "csv"})


@pytest.mark.anyio
async def test_refresh_updates_the_schema_names(skills_dir: Path) -> None:
    tool = LoadSkillTool(skills_dir)  # reads the skills on disk for its schema
    assert tool.input_schema["properties"]["name"]["enum"] == ["csv", "pdf-forms"]
    write_skill(skills_dir, "new", "---\nname: new\ndescription: A new skill.\n---\nNew.\n")
    assert [s.name for s in await tool.refresh()] == ["csv", "new", "pdf-forms"]
    assert tool.input_schema["properties"]["name"]["enum"] == ["csv", "new", "pdf-forms"]


def test_a_huge_skill_costs_no_prompt_and_no_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 3 MB description made every system prompt 450 KB and agent_info 3 MB; a 57 MB body was read on
    every create_trace. Descriptions are cut, oversized files and names skipped, skills counted."""
    from agent.skills import MAX_DESCRIPTION_CHARS, MAX_SKILL_BYTES, MAX_SKILLS

    write_skill(tmp_path, "a-wordy", f"---\nname: wordy\ndescription: {'very ' * 20_000}long\n---\nbody\n")
    write_skill(tmp_path, "heavy", "---\nname: heavy\ndescription: big\n---\n" + "x" * (MAX_SKILL_BYTES + 1))
    write_skill(tmp_path, "named", f"---\nname: {'n' * 500}\ndescription: d\n---\n")
    for i in range(MAX_SKILLS + 5):
        write_skill(tmp_path, f"s{i:03}", f"---\nname: s{i:03}\ndescription: skill {i}\n---\n")
    with caplog.at_level(logging.WARNING):
        skills = load_skills(tmp_path)
    assert len(skills) == MAX_SKILLS and "heavy" not in {s.name for s in skills}
    assert all(len(s.name) <= 100 for s in skills)
    wordy = next(s for s in skills if s.name == "wordy")  # its folder sorts first: within the count
    assert len(wordy.description) == MAX_DESCRIPTION_CHARS
    assert f"over {MAX_SKILL_BYTES} bytes" in caplog.text and f"at most {MAX_SKILLS} skills" in caplog.text
    assert len(build_system_prompt(skills)) < MAX_SKILLS * (MAX_DESCRIPTION_CHARS + 120)


def test_links_may_point_within_the_skills_folder_never_out_of_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pitfalls.md: a symlink inside the root can point outside it. A linked skill folder inside is fine."""
    root = tmp_path / "skills"
    write_skill(root, "pdf", PDF_SKILL)
    (root / "pdf-again").symlink_to(root / "pdf")  # within: the same skill, a duplicate name, skipped
    outside = write_skill(tmp_path / "outside", "notes", PDF_SKILL.replace("pdf-forms", "private-notes"))
    (root / "private").mkdir()
    (root / "private" / "SKILL.md").symlink_to(outside)
    (root / "folder-link").symlink_to(outside.parent)
    with caplog.at_level(logging.WARNING):
        names = [skill.name for skill in load_skills(root)]
    assert names == ["pdf-forms"]
    assert caplog.text.count("leads outside the skills folder") == 2


def test_a_fifo_or_a_grown_file_is_refused_without_waiting_or_reading_past_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    root = tmp_path / "skills"
    (root / "fifo").mkdir(parents=True)
    os.mkfifo(root / "fifo" / "SKILL.md")  # no writer: opening it for reading would wait forever
    (root / "proc").mkdir()
    (root / "proc" / "SKILL.md").symlink_to("/proc/self/environ")  # outside, and stat says 0 bytes
    write_skill(root, "pdf", PDF_SKILL)
    with caplog.at_level(logging.WARNING):
        assert [skill.name for skill in load_skills(root)] == ["pdf-forms"]
    assert "not a regular file" in caplog.text and "leads outside" in caplog.text
