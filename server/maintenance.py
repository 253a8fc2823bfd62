"""``agent-trace-mcp consolidate``: one curation pass over the experiences file, from the command line."""

from __future__ import annotations

import sys

from agent.errors import TraceError
from agent.experiences import Experiences
from agent.llm.base import resolve_model
from server.settings import Settings


async def consolidate_now(settings: Settings) -> int:
    experiences = Experiences(settings.experiences)
    try:
        model = resolve_model(settings.model)
        result = await experiences.consolidate(model, settings.experience_budget, force=True)
    except TraceError as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return 2
    finally:
        experiences.close()
    print(result.model_dump_json(indent=2))
    return 0 if not result.skipped_reason else 1
