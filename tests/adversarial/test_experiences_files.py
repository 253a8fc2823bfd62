"""An experiences path that is not a UTF-8 file: refused at once, or rewritten without losing a byte.

Found by an adversarial audit: a FIFO at the path hung get_experiences and every create_trace (recall) for
good, and a hand-kept Latin-1 file was silently rewritten with replacement characters and no backup.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import anyio
import pytest

from agent.errors import ExperiencesUnreadable
from agent.experiences.file import ExperienceFile

pytestmark = pytest.mark.anyio

LATIN_1 = "# Experiences\n\n## by hand\n- Café naïve résumé: keep these bytes\n".encode("latin-1")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
async def test_a_fifo_at_the_experiences_path_is_a_sentence_not_a_hang(tmp_path):
    path = tmp_path / "experiences.md"
    os.mkfifo(path)
    file = ExperienceFile(path)
    with anyio.fail_after(5):
        for read in (file.read_text, lambda: file.read_bounded()):
            with pytest.raises(ExperiencesUnreadable, match="is not a regular file"):
                await read()
        with pytest.raises(ExperiencesUnreadable, match="is not a regular file"):
            await file.append_section("t" * 32, ["a lesson"], datetime.now(UTC), "test")


async def test_a_file_that_is_not_utf8_keeps_its_bytes_in_a_backup_when_rewritten(tmp_path, caplog):
    path = tmp_path / "experiences.md"
    path.write_bytes(LATIN_1)
    await ExperienceFile(path).append_section("a" * 32, ["Check the changelog first"], datetime.now(UTC), "t")
    backups = [p for p in tmp_path.iterdir() if p.name != "experiences.md"]
    assert [b.read_bytes() for b in backups] == [LATIN_1]
    assert "Check the changelog first" in path.read_text(encoding="utf-8")
    assert "is not UTF-8" in caplog.text
    await ExperienceFile(path).append_section("b" * 32, ["Another"], datetime.now(UTC), "t")
    assert (
        len([p for p in tmp_path.iterdir() if p.name != "experiences.md"]) == 1
    )  # UTF-8 now: no more copies


async def test_a_folder_at_the_experiences_path_is_a_sentence_when_written_too(tmp_path):
    (tmp_path / "experiences.md").mkdir()
    with pytest.raises(ExperiencesUnreadable, match="is not a regular file"):
        await ExperienceFile(tmp_path / "experiences.md").append_section(
            "t" * 32, ["x"], datetime.now(UTC), "t"
        )
