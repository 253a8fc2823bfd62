"""The TraceError family: every refusal the engine makes, each carrying a sentence a person can act on.

The server maps any TraceError to a tool error with ``str(error)`` as its text, so messages here are
written for the people (and models) calling the tools.
"""

import errno


class TraceError(Exception):
    """Base of every error the engine raises on purpose; its text is safe to show to a client."""


class TraceNotFound(TraceError):
    def __init__(self, trace_id: str):
        shown = trace_id if len(trace_id) <= 64 else f"{trace_id[:40]}… ({len(trace_id):,} characters)"
        super().__init__(f"There is no trace '{shown}'; list_traces shows the traces that exist.")
        self.trace_id = trace_id


class SequenceError(TraceError):
    """A sequence that is not in the trace, or a cut that would split a tool-call group."""


class TraceRunning(TraceError):
    def __init__(self, trace_id: str, action: str = "run"):
        super().__init__(
            f"Trace '{trace_id}' is already running; wait for it to finish or call stop_trace before you {action} it."
        )
        self.trace_id = trace_id


class TraceMoved(TraceRunning):
    """Another run went first: the head this request was prepared from is no longer the trace's head."""

    def __init__(self, trace_id: str, head: int | None):
        TraceError.__init__(
            self,
            f"Trace '{trace_id}' was run by another call while this one was starting (its head is now message "
            f"{head}); read it with get_trace and send run_trace again if it still applies.",
        )
        self.trace_id = trace_id


class TraceReflecting(TraceRunning):
    """Another process still holds a trace whose run has ended: it is reflecting on it (reflect=true)."""

    def __init__(self, trace_id: str, waited: float):
        TraceError.__init__(
            self,
            f"Trace '{trace_id}' has finished its run, but another server process sharing the store is still "
            f"reflecting on it (reflect=true) after {waited:.0f} s of waiting; nothing was stored: send this "
            "run_trace again in a little while.",
        )
        self.trace_id = trace_id


class SchemaTooNew(TraceError):
    """A database a newer agent-trace-mcp migrated: this one must not read or write it."""

    def __init__(self, version: int, understood: int):
        super().__init__(
            f"The trace database has schema version {version}, newer than this agent-trace-mcp understands "
            f"({understood}); upgrade agent-trace-mcp."
        )


class ExperiencesUnreadable(TraceError, OSError):
    """The experiences path is not a file that can be read (a FIFO, a device): a sentence, never a hang."""


class InvalidMessages(TraceError):
    """Messages that are not valid OpenAI chat messages, or that leave the conversation invalid."""


class ModelConfigError(TraceError):
    """Unknown provider, missing API key or missing optional extra: found when the run is requested."""


class ModelCallError(TraceError):
    """A provider error that survived the SDK's retries; ends the run ``failed``."""


class ContextTooLong(ModelCallError):
    """The provider refused the request as longer than the model's context window."""


class UnknownToolError(TraceError):
    """A tool whitelist naming tools or servers that do not exist."""


class ToolCallError(Exception):
    """Raised by a tool to report a failure the model should read (not a crash)."""


def storage_trouble(exc: BaseException) -> str | None:
    """A sentence for the storage failures a host can do something about (a full disk, a database another
    process holds locked), told by their types and codes, whatever backend raised them; None otherwise."""
    kind, text = type(exc).__name__, str(exc).lower()
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or kind == "DiskFullError"
    if kind == "OperationalError":  # sqlite3's: its message is the only code it gives
        full = full or "database or disk is full" in text
    if full:
        return "the disk holding the trace database is full; free some space and try again (what is stored is intact)."
    locked = kind in ("LockNotAvailableError", "DeadlockDetectedError", "QueryCanceledError") or (
        kind == "OperationalError" and "database is locked" in text
    )
    if locked:
        return (
            "the trace database stayed locked by another process for too long; try again in a moment "
            "(what is stored is intact)."
        )
    return None
