"""Numbered schema migrations, applied in order and recorded in ``PRAGMA user_version``.

To change the schema, append a function; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from agent.errors import SchemaTooNew


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Statement by statement: ``executescript`` would commit the migration's transaction early.

    Split where SQLite says a statement is complete, so triggers (``BEGIN … ; … END``) stay whole.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                db.execute(pending)
            pending = ""
    if pending.strip(" \n;"):
        db.execute(pending)


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


NOW_SECONDS = "((julianday('now') - 2440587.5) * 86400.0)"
"""Unix time in SQL (sub-second), for the change log's pruning."""


def m005_claims_and_changes(db: sqlite3.Connection) -> None:
    """Runs are claimed in the database with a token and a lease their owner renews; stop requests are
    stored; side-branch messages never move the head; every change is logged for other processes."""
    _run_script(
        db,
        f"""
        ALTER TABLE traces ADD COLUMN run_token TEXT;
        ALTER TABLE traces ADD COLUMN lease_until REAL;
        ALTER TABLE traces ADD COLUMN stop_requested INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX traces_claimed ON traces (owner) WHERE run_token IS NOT NULL;
        ALTER TABLE messages ADD COLUMN side INTEGER NOT NULL DEFAULT 0;

        CREATE TABLE changes (
            id          INTEGER PRIMARY KEY,
            trace_id    TEXT NOT NULL,
            kind        TEXT NOT NULL,
            sequence    INTEGER,
            token       TEXT,
            created_at  REAL NOT NULL
        );

        DROP TRIGGER message_appended;
        CREATE TRIGGER message_appended AFTER INSERT ON messages
        BEGIN
            UPDATE traces SET
                last_sequence = NEW.sequence,
                head_sequence = CASE WHEN NEW.side THEN head_sequence ELSE NEW.sequence END,
                updated_at = NEW.created_at,
                usage = json_set(usage,
                    '$.prompt_tokens', json_extract(usage, '$.prompt_tokens')
                        + coalesce(json_extract(NEW.usage, '$.prompt_tokens'), 0),
                    '$.completion_tokens', json_extract(usage, '$.completion_tokens')
                        + coalesce(json_extract(NEW.usage, '$.completion_tokens'), 0),
                    '$.llm_calls', json_extract(usage, '$.llm_calls') + (NEW.role = 'assistant'),
                    '$.tool_calls', json_extract(usage, '$.tool_calls') + (NEW.role = 'tool'))
            WHERE trace_id = NEW.trace_id;
            INSERT INTO changes (trace_id, kind, sequence, token, created_at)
            SELECT NEW.trace_id, 'message', NEW.sequence, run_token, {NOW_SECONDS}
            FROM traces WHERE trace_id = NEW.trace_id;
        END;

        CREATE TRIGGER trace_created AFTER INSERT ON traces
        BEGIN
            INSERT INTO changes (trace_id, kind, token, created_at)
            VALUES (NEW.trace_id, 'created', NEW.run_token, {NOW_SECONDS});
        END;

        CREATE TRIGGER trace_changed AFTER UPDATE ON traces
        WHEN OLD.status IS NOT NEW.status OR OLD.run_token IS NOT NEW.run_token
            OR OLD.stop_requested IS NOT NEW.stop_requested OR OLD.name IS NOT NEW.name
            OR (OLD.head_sequence IS NOT NEW.head_sequence AND OLD.last_sequence = NEW.last_sequence)
        BEGIN
            INSERT INTO changes (trace_id, kind, token, created_at)
            VALUES (NEW.trace_id,
                    CASE WHEN NEW.stop_requested AND NOT OLD.stop_requested THEN 'stop' ELSE 'trace' END,
                    coalesce(NEW.run_token, OLD.run_token), {NOW_SECONDS});
        END;

        CREATE TRIGGER trace_deleted AFTER DELETE ON traces
        BEGIN
            INSERT INTO changes (trace_id, kind, created_at) VALUES (OLD.trace_id, 'deleted', {NOW_SECONDS});
        END
        """,
    )


def m006_steering(db: sqlite3.Connection) -> None:
    """Tags to group traces, when the latest run started, the question a paused trace asks, the typed
    result, and where a fork came from."""
    _run_script(
        db,
        """
        ALTER TABLE traces ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE traces ADD COLUMN started_at TEXT;
        ALTER TABLE traces ADD COLUMN question TEXT;
        ALTER TABLE traces ADD COLUMN result TEXT;
        ALTER TABLE traces ADD COLUMN forked_from TEXT
        """,
    )


def _message_trigger(model_call: str) -> str:
    """The trigger (since migration 7) that moves the head and adds a message to its trace's totals;
    ``model_call`` is the SQL condition for a message that counts as one model call."""
    return f"""
        DROP TRIGGER message_appended;
        CREATE TRIGGER message_appended AFTER INSERT ON messages
        BEGIN
            UPDATE traces SET
                last_sequence = NEW.sequence,
                head_sequence = CASE WHEN NEW.side THEN head_sequence ELSE NEW.sequence END,
                updated_at = NEW.created_at,
                usage = json_set(usage,
                    '$.prompt_tokens', json_extract(usage, '$.prompt_tokens')
                        + coalesce(json_extract(NEW.usage, '$.prompt_tokens'), 0),
                    '$.completion_tokens', json_extract(usage, '$.completion_tokens')
                        + coalesce(json_extract(NEW.usage, '$.completion_tokens'), 0),
                    '$.llm_calls', json_extract(usage, '$.llm_calls') + ({model_call}),
                    '$.tool_calls', json_extract(usage, '$.tool_calls') + (NEW.role = 'tool'),
                    '$.compactions', coalesce(json_extract(usage, '$.compactions'), 0)
                        + (json_extract(NEW.meta, '$.compaction') IS NOT NULL),
                    '$.tokens_saved', coalesce(json_extract(usage, '$.tokens_saved'), 0)
                        + coalesce(json_extract(NEW.meta, '$.compaction.tokens_saved'), 0))
            WHERE trace_id = NEW.trace_id;
            INSERT INTO changes (trace_id, kind, sequence, token, created_at)
            SELECT NEW.trace_id, 'message', NEW.sequence, run_token, {NOW_SECONDS}
            FROM traces WHERE trace_id = NEW.trace_id;
        END
        """


def m007_compaction_records(db: sqlite3.Connection) -> None:
    """Messages carry engine records (a context compaction); totals count compactions and tokens saved."""
    _run_script(db, "ALTER TABLE messages ADD COLUMN meta TEXT;" + _message_trigger("NEW.role = 'assistant'"))


def m008_model_calls_only(db: sqlite3.Connection) -> None:
    """llm_calls (a trace's steps) counts the model's replies only, which carry usage: not the assistant
    messages a caller passes in with its history."""
    _run_script(db, _message_trigger("NEW.role = 'assistant' AND NEW.usage IS NOT NULL"))


def m009_run_handles(db: sqlite3.Connection) -> None:
    """Handles given out for runs (MCP tasks), with the view each keeps once a later run supersedes it."""
    _run_script(
        db,
        """
        CREATE TABLE run_handles (
            handle_id   TEXT PRIMARY KEY,
            trace_id    TEXT NOT NULL REFERENCES traces (trace_id),
            created_at  TEXT NOT NULL,
            final       TEXT
        );
        CREATE INDEX run_handles_by_trace ON run_handles (trace_id, created_at)
        """,
    )


def m010_handle_holders(db: sqlite3.Connection) -> None:
    """Which process holds a handle whose work it does itself (a reflection task), so that a reader can
    tell one cut off by its process's end from one still going."""
    _run_script(db, "ALTER TABLE run_handles ADD COLUMN held_by TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_initial,
    m002_recalled_lessons,
    m003_head_follows_messages,
    m004_run_owner,
    m005_claims_and_changes,
    m006_steering,
    m007_compaction_records,
    m008_model_calls_only,
    m009_run_handles,
    m010_handle_holders,
]


def migrate(db: sqlite3.Connection) -> int:
    """Bring a database to the newest schema, each step in its own transaction; returns the version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise SchemaTooNew(version, len(MIGRATIONS))
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
