"""Where experiences live: the markdown file beside a SQLite store, the database itself with PostgreSQL.

Also the ``experiences export FILE`` / ``import FILE`` commands, for either backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from agent.errors import TraceError
from agent.experiences import Experiences
from agent.experiences.file import ExperienceFile
from agent.experiences.markdown import parse
from agent.trace.backends import is_postgres_url, open_store
from agent.trace.store import TraceStore

if TYPE_CHECKING:
    from agent.experiences.database import DatabaseExperiences


@dataclass(frozen=True)
class TransferResult:
    """What an export or an import moved; ``version`` is the database version an import made."""

    sections: int
    lessons: int
    version: int | None = None


def open_experiences(db: str | Path, path: str | Path, store: TraceStore) -> Experiences:
    """The experiences for a store opened from ``db``: rows in its database when it is PostgreSQL
    (``path`` is then only where an export goes by default), else the markdown file at ``path``."""
    return _in_database(store, path) if is_postgres_url(db) else Experiences(path)


def _in_database(store: TraceStore, path: str | Path) -> DatabaseExperiences:
    """Imported here: the database backend needs the ``postgres`` extra."""
    from agent.experiences.database import DatabaseExperiences
    from agent.trace.postgres import PostgresTraceStore

    if not isinstance(store, PostgresTraceStore):
        raise TypeError("a postgresql:// store must be a PostgresTraceStore")
    return DatabaseExperiences(store, path)


async def export_experiences(
    db: str | Path, path: str | Path, target: str | Path, *, version: int | None = None
) -> TransferResult:
    """Write the experiences markdown (``version``: as of that database version) to ``target`` (an existing
    file there is kept as a dated backup); TraceError, before anything is opened, for a target in a folder
    that does not exist or a folder, or a version asked of the file store (it keeps dated backups)."""
    if version is not None and not is_postgres_url(db):
        raise TraceError(
            f"only a PostgreSQL store keeps versions; the file store keeps a dated backup beside {path} "
            "before each consolidation or import."
        )
    target = Path(target)
    if target.is_dir():
        raise TraceError(f"{target} is a folder; give a file name.")
    if not target.parent.is_dir():
        raise TraceError(f"the folder {target.parent} does not exist.")
    store = await open_store(db)
    try:
        if is_postgres_url(db):
            return await _in_database(store, path).export(target, version=version)
        text = await ExperienceFile(path).read_text()
        await ExperienceFile(target).replace(text, backup=True)
        return await _counted(text)
    finally:
        await store.close()


async def import_experiences(db: str | Path, path: str | Path, source: str | Path) -> TransferResult:
    """Load ``source`` (an experiences.md) as the current experiences, the prior ones kept (a version in
    the database, a dated backup of the file), and tell every server on the store that they changed.
    TraceError, with nothing changed, when ``source`` is not a file or holds no lessons (either would erase
    them: a wrong file named by mistake)."""
    if not Path(source).is_file():
        raise TraceError(f"{source} is not a file (nothing was changed).")
    parsed = await anyio.to_thread.run_sync(parse, await ExperienceFile(source).read_text())
    if not any(section.trace_id and section.when and section.lessons for section in parsed.sections):
        raise TraceError(
            f"{source} holds no reflection's lessons (a '## <trace_id> (<YYYY-MM-DD HH:MM>)' section with "
            "'- ' lines), so it is not an experiences file; nothing was changed."
        )
    store = await open_store(db)
    try:
        if is_postgres_url(db):
            return await _in_database(store, path).import_file(source)
        text = await ExperienceFile(source).read_text()
        await ExperienceFile(path).replace(text, backup=True)
        await store.note_change("experiences")  # for servers that do not watch this file (another path)
        return await _counted(text)
    finally:
        await store.close()


async def _counted(text: str) -> TransferResult:
    parsed = await anyio.to_thread.run_sync(parse, text)
    return TransferResult(len(parsed.sections), len(parsed.lessons()))
