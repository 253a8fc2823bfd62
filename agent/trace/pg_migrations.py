"""Numbered schema migrations of the PostgreSQL store, applied in order and recorded in ``schema_migrations``.

Each step runs in its own transaction under an advisory lock keyed by the schema, so replicas that start
together apply each step once. To change the schema, append a function; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from agent.errors import SchemaTooNew

Db: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
"""A connection of its own or one lent by the pool."""


async def m001_traces_and_messages(db: Db) -> None:
    """Traces with their claim and head; messages as a tree keyed by (trace_id, sequence).

    Timestamps the store compares or pages by are ISO 8601 text in the "C" collation, exactly as SQLite
    orders them, so cursors are the same on both backends; leases are ``timestamptz`` on the database's
    clock. Message text is ``json`` (a JSON string), because PostgreSQL text cannot hold U+0000 and tool
    output may.
    """
    await db.execute(
        """
        CREATE FUNCTION iso_utc(ts timestamptz) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
        AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') $$;

        CREATE TABLE traces (
            trace_id        text COLLATE "C" PRIMARY KEY,
            name            text,
            uid             text,
            model           text NOT NULL,
            config          json NOT NULL,
            status          text NOT NULL,
            stop_reason     text,
            head_sequence   integer,
            last_sequence   integer NOT NULL DEFAULT 0,
            created_at      text COLLATE "C" NOT NULL,
            updated_at      text COLLATE "C" NOT NULL,
            error           text,
            usage           jsonb NOT NULL,
            lessons         json NOT NULL DEFAULT '[]',
            owner           text,
            run_token       text,
            lease_until     timestamptz,
            stop_requested  boolean NOT NULL DEFAULT false
        );
        CREATE INDEX traces_by_created ON traces (created_at DESC, trace_id DESC);
        CREATE INDEX traces_by_status ON traces (status, created_at DESC, trace_id DESC);
        CREATE INDEX traces_by_uid ON traces (uid, created_at DESC, trace_id DESC);
        CREATE INDEX traces_claimed ON traces (owner, lease_until) WHERE run_token IS NOT NULL;

        CREATE TABLE messages (
            trace_id         text COLLATE "C" NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
            sequence         integer NOT NULL,
            parent_sequence  integer,
            role             text NOT NULL,
            content          json,
            tool_calls       json,
            tool_call_id     text,
            name             text,
            usage            jsonb,
            created_at       text COLLATE "C" NOT NULL,
            side             boolean NOT NULL DEFAULT false,
            PRIMARY KEY (trace_id, sequence)
        );
        CREATE INDEX messages_by_parent ON messages (trace_id, parent_sequence);
        """
    )


async def m002_change_feed(db: Db) -> None:
    """Every change is a row other replicas tail, numbered in commit order, with a NOTIFY carrying its id.

    A sequence alone numbers rows in the order they were written, not committed, so a reader could pass
    an id whose writer commits later; the writers of the log therefore take a transaction-scoped advisory
    lock before numbering (PostgreSQL already serialises the commits of notifying transactions).
    """
    await db.execute(
        """
        CREATE TABLE changes (
            id          bigint PRIMARY KEY,
            trace_id    text COLLATE "C" NOT NULL,
            kind        text NOT NULL,
            sequence    integer,
            token       text,
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE SEQUENCE changes_id_seq OWNED BY changes.id;

        CREATE FUNCTION change_channel(schema_name text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT 'agent_trace_' || left(md5(schema_name), 16) $$;

        CREATE FUNCTION number_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtextextended('agent-trace-mcp:changes:' || TG_TABLE_SCHEMA, 0));
            NEW.id := nextval(format('%I.changes_id_seq', TG_TABLE_SCHEMA));
            PERFORM pg_notify(change_channel(TG_TABLE_SCHEMA), NEW.id::text);
            RETURN NEW;
        END $$;
        CREATE TRIGGER change_numbered BEFORE INSERT ON changes
            FOR EACH ROW EXECUTE FUNCTION number_change();

        CREATE FUNCTION log_trace_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO changes (trace_id, kind, token) VALUES (NEW.trace_id, 'created', NEW.run_token);
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO changes (trace_id, kind, token)
                VALUES (NEW.trace_id,
                        CASE WHEN NEW.stop_requested AND NOT OLD.stop_requested THEN 'stop' ELSE 'trace' END,
                        coalesce(NEW.run_token, OLD.run_token));
            ELSE
                INSERT INTO changes (trace_id, kind) VALUES (OLD.trace_id, 'deleted');
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER trace_created AFTER INSERT ON traces
            FOR EACH ROW EXECUTE FUNCTION log_trace_change();
        CREATE TRIGGER trace_changed AFTER UPDATE ON traces FOR EACH ROW
            WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.run_token IS DISTINCT FROM NEW.run_token
                  OR OLD.stop_requested IS DISTINCT FROM NEW.stop_requested
                  OR OLD.name IS DISTINCT FROM NEW.name
                  OR (OLD.head_sequence IS DISTINCT FROM NEW.head_sequence
                      AND OLD.last_sequence = NEW.last_sequence))
            EXECUTE FUNCTION log_trace_change();
        CREATE TRIGGER trace_deleted AFTER DELETE ON traces
            FOR EACH ROW EXECUTE FUNCTION log_trace_change();
        """
    )


async def m003_steering(db: Db) -> None:
    """Tags to group traces (indexed for the tag filter), when the latest run started, the question a
    paused trace asks, the typed result, and where a fork came from (SQLite's migration 6)."""
    await db.execute(
        """
        ALTER TABLE traces
            ADD COLUMN tags jsonb NOT NULL DEFAULT '[]',
            ADD COLUMN started_at text COLLATE "C",
            ADD COLUMN question text,
            ADD COLUMN result json,
            ADD COLUMN forked_from json;
        CREATE INDEX traces_by_tag ON traces USING gin (tags jsonb_path_ops);
        CREATE INDEX traces_finished ON traces (updated_at) WHERE run_token IS NULL AND status <> 'running';
        """
    )


async def m004_compaction_records(db: Db) -> None:
    """Messages carry engine records (a context compaction), as ``json`` so any text fits (SQLite's
    migration 7); the append counts compactions and tokens saved in the trace's totals."""
    await db.execute("ALTER TABLE messages ADD COLUMN meta json")


async def m005_experiences(db: Db) -> None:
    """Experiences in the database: a section per reflection (its source trace and sequences), a row per
    lesson with a ``tsvector`` for recall, and numbered versions; a consolidation or an import retires
    lessons in a new version instead of deleting them, so every prior version can still be read."""
    await db.execute(
        """
        CREATE TABLE experience_versions (
            version     integer PRIMARY KEY,
            kind        text NOT NULL,
            preamble    text,
            summary     json NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE TABLE experience_sections (
            id              bigserial PRIMARY KEY,
            heading         text NOT NULL,
            trace_id        text COLLATE "C",
            first_sequence  integer,
            last_sequence   integer,
            written         text,
            source          text,
            notes           json NOT NULL DEFAULT '{}',
            created_in      integer NOT NULL DEFAULT 0,
            created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX experience_sections_by_trace ON experience_sections (trace_id);
        CREATE TABLE experience_lessons (
            id          bigserial PRIMARY KEY,
            section_id  bigint NOT NULL REFERENCES experience_sections (id) ON DELETE CASCADE,
            position    integer NOT NULL,
            text        text NOT NULL,
            search      tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
            retired_in  integer REFERENCES experience_versions (version)
        );
        CREATE INDEX experience_lessons_search ON experience_lessons USING gin (search)
            WHERE retired_in IS NULL;
        CREATE INDEX experience_lessons_current ON experience_lessons (section_id, position)
            WHERE retired_in IS NULL;
        CREATE INDEX experience_lessons_by_section ON experience_lessons (section_id, position);
        """
    )


async def m006_changes_logged_at_commit(db: Db) -> None:
    """Changes are logged (and numbered, under the log's lock) when their transaction commits, not when
    the statement runs: deferred constraint triggers on messages and traces insert the change rows, so
    the lock is held only through the commit itself (which notifying transactions serialise anyway),
    and writers no longer queue behind one another for the whole of their statements."""
    await db.execute(
        """
        DROP TRIGGER trace_created ON traces;
        DROP TRIGGER trace_changed ON traces;
        DROP TRIGGER trace_deleted ON traces;
        CREATE CONSTRAINT TRIGGER trace_created AFTER INSERT ON traces
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION log_trace_change();
        CREATE CONSTRAINT TRIGGER trace_changed AFTER UPDATE ON traces
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.run_token IS DISTINCT FROM NEW.run_token
                  OR OLD.stop_requested IS DISTINCT FROM NEW.stop_requested
                  OR OLD.name IS DISTINCT FROM NEW.name
                  OR (OLD.head_sequence IS DISTINCT FROM NEW.head_sequence
                      AND OLD.last_sequence = NEW.last_sequence))
            EXECUTE FUNCTION log_trace_change();
        CREATE CONSTRAINT TRIGGER trace_deleted AFTER DELETE ON traces
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION log_trace_change();

        CREATE FUNCTION log_message_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO changes (trace_id, kind, sequence, token)
            SELECT NEW.trace_id, 'message', NEW.sequence, run_token FROM traces WHERE trace_id = NEW.trace_id;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER message_appended AFTER INSERT ON messages
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION log_message_change();
        """
    )


async def m007_run_handles(db: Db) -> None:
    """Handles given out for runs (MCP tasks), with the view each keeps once a later run supersedes it."""
    await db.execute(
        """
        CREATE TABLE run_handles (
            handle_id   text COLLATE "C" PRIMARY KEY,
            trace_id    text COLLATE "C" NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
            created_at  text COLLATE "C" NOT NULL,
            seq         bigserial,
            final       json
        );
        CREATE INDEX run_handles_by_trace ON run_handles (trace_id, created_at, seq);
        """
    )


async def m008_handle_holders(db: Db) -> None:
    """Which process holds a handle whose work it does itself (a reflection task), so that a reader can
    tell one cut off by its process's end from one still going."""
    await db.execute("ALTER TABLE run_handles ADD COLUMN held_by text")


Migration = Callable[[Db], Awaitable[None]]

MIGRATIONS: list[Migration] = [
    m001_traces_and_messages,
    m002_change_feed,
    m003_steering,
    m004_compaction_records,
    m005_experiences,
    m006_changes_logged_at_commit,
    m007_run_handles,
    m008_handle_holders,
]


async def migrate(db: Db, schema: str, *, upto: int | None = None) -> int:
    """Bring ``schema`` (created when missing) to the newest version, or to ``upto``; returns the version.

    The connection's ``search_path`` must name ``schema`` first.
    """
    target = len(MIGRATIONS) if upto is None else upto
    async with db.transaction():
        await _lock(db, schema)
        if await db.fetchval("SELECT to_regnamespace(quote_ident($1)) IS NULL", schema):
            await db.execute(f"CREATE SCHEMA {_quote(schema)}")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    version = 0
    for number in range(1, target + 1):
        async with db.transaction():
            await _lock(db, schema)
            version = await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            if version > len(MIGRATIONS):
                raise SchemaTooNew(version, len(MIGRATIONS))
            if version >= number:
                continue
            step = MIGRATIONS[number - 1]
            await step(db)
            await db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", number, step.__name__
            )
            version = number
    return version


async def _lock(db: Db, schema: str) -> None:
    """Wait for any replica migrating the same schema (however long its step takes), then hold it off."""
    await db.execute("SET LOCAL statement_timeout = 0")
    await db.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('agent-trace-mcp:migrate:' || $1, 0))", schema
    )


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
