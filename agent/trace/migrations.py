"""Numbered schema migrations, applied in order and recorded in ``PRAGMA user_version``.

To change the schema, append a function; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Statement by statement: ``executescript`` would commit the migration's transaction early."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def m001_initial(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE traces (
            trace_id       TEXT PRIMARY KEY,
            name           TEXT,
            uid            TEXT,
            model          TEXT NOT NULL,
            config         TEXT NOT NULL,
            status         TEXT NOT NULL,
            stop_reason    TEXT,
            head_sequence  INTEGER,
            last_sequence  INTEGER NOT NULL DEFAULT 0,
            created_at     TEXT NOT NULL,
            updated_at     TEXT NOT NULL,
            error          TEXT,
            usage          TEXT NOT NULL
        );
        CREATE INDEX traces_by_created ON traces (created_at DESC, trace_id DESC);
        CREATE INDEX traces_by_status ON traces (status, created_at DESC);
        CREATE INDEX traces_by_uid ON traces (uid, created_at DESC);

        CREATE TABLE messages (
            trace_id        TEXT NOT NULL REFERENCES traces (trace_id),
            sequence        INTEGER NOT NULL,
            parent_sequence INTEGER,
            role            TEXT NOT NULL,
            content         TEXT,
            tool_calls      TEXT,
            tool_call_id    TEXT,
            name            TEXT,
            usage           TEXT,
            created_at      TEXT NOT NULL,
            PRIMARY KEY (trace_id, sequence)
        ) WITHOUT ROWID;
        CREATE INDEX messages_by_parent ON messages (trace_id, parent_sequence);
        """,
    )


def m002_recalled_lessons(db: sqlite3.Connection) -> None:
    """Traces remember which experience lessons were put into their system prompt."""
    db.execute("ALTER TABLE traces ADD COLUMN lessons TEXT NOT NULL DEFAULT '[]'")


def m003_head_follows_messages(db: sqlite3.Connection) -> None:
    """Appending a message moves the head and adds to the totals in the same statement (one commit)."""
    db.execute(
        """
        CREATE TRIGGER message_appended AFTER INSERT ON messages
        BEGIN
            UPDATE traces SET
                last_sequence = NEW.sequence,
                head_sequence = NEW.sequence,
                updated_at = NEW.created_at,
                usage = json_set(usage,
                    '$.prompt_tokens', json_extract(usage, '$.prompt_tokens')
                        + coalesce(json_extract(NEW.usage, '$.prompt_tokens'), 0),
                    '$.completion_tokens', json_extract(usage, '$.completion_tokens')
                        + coalesce(json_extract(NEW.usage, '$.completion_tokens'), 0),
                    '$.llm_calls', json_extract(usage, '$.llm_calls') + (NEW.role = 'assistant'),
                    '$.tool_calls', json_extract(usage, '$.tool_calls') + (NEW.role = 'tool'))
            WHERE trace_id = NEW.trace_id;
        END
        """
    )


def m004_run_owner(db: sqlite3.Connection) -> None:
    """Which process runs a trace, so a second server on the same database does not mark its runs
    interrupted."""
    db.execute("ALTER TABLE traces ADD COLUMN owner TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_initial,
    m002_recalled_lessons,
    m003_head_follows_messages,
    m004_run_owner,
]


def migrate(db: sqlite3.Connection) -> int:
    """Bring a database to the newest schema, each step in its own transaction; returns the version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"The trace database has schema version {version}, newer than this agent-trace-mcp "
            f"understands ({len(MIGRATIONS)}); upgrade agent-trace-mcp."
        )
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
