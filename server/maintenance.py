"""``agent-trace-mcp consolidate`` and ``experiences export|import``: experiences from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.errors import TraceError
from agent.experiences.backends import export_experiences, import_experiences, open_experiences
from agent.llm.base import resolve_model
from agent.trace.backends import open_store
from server.settings import Settings


async def consolidate_now(settings: Settings) -> int:
    """One curation pass with the configured model; every server on the store hears of the change."""
    try:
        store = await open_store(settings.db)
    except TraceError as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return 2
    experiences = open_experiences(settings.db, settings.experiences, store)
    try:
        model = resolve_model(settings.model)
        result = await experiences.consolidate(model, settings.experience_budget, force=True)
    except TraceError as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return 2
    finally:
        experiences.close()
        await store.close()
    print(result.model_dump_json(indent=2))
    return 1 if result.failed else 0  # nothing to merge is a pass that succeeded


async def transfer(settings: Settings, action: str, file: str, as_of: int | None = None) -> int:
    """``experiences export FILE`` writes the markdown (``as_of``: a PostgreSQL version of it);
    ``experiences import FILE`` loads one (the prior experiences kept as a version or a dated backup)."""
    try:
        if action == "export":
            moved = await export_experiences(settings.db, settings.experiences, Path(file), version=as_of)
        elif as_of is not None:
            raise TraceError("--as-of applies to experiences export, not import.")
        else:
            moved = await import_experiences(settings.db, settings.experiences, Path(file))
    except (TraceError, OSError, ValueError) as exc:
        print(f"agent-trace-mcp: experiences {action} failed: {exc}", file=sys.stderr)
        return 2
    verb = "wrote" if action == "export" else "loaded"
    line = f"{verb} {moved.sections} section(s), {moved.lessons} lesson(s) {'to' if action == 'export' else 'from'} {file}"
    if action == "import" and moved.version is not None:
        line += (
            f"; the lessons before it are version {moved.version - 1} "
            f"(experiences export FILE --as-of {moved.version - 1} writes them out)"
        )
    print(line)
    return 0
