"""What the engine needs to know: a small module, so reading settings never imports the engine itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent import defaults


@dataclass
class EngineSettings:
    """What the engine needs to know; the server's Settings extends it with transport options."""

    data_dir: Path
    db: Path | str
    experiences: Path
    model: str = defaults.MODEL
    mcp_config: Path | None = None
    skills_dir: Path = field(default_factory=Path)
    workspace: Path = field(default_factory=Path)
    experience_recall: int = defaults.EXPERIENCE_RECALL
    experience_budget: int = defaults.EXPERIENCE_BUDGET
    tool_timeout: float = defaults.TOOL_TIMEOUT_SECONDS
    max_wait: float = defaults.MAX_WAIT_SECONDS
    context_tokens: int | None = None
    """The prompt budget; None: the model's known window, else ``defaults.CONTEXT_TOKENS``."""
    retain_days: float | None = None
    """Finished traces older than this are deleted (None: kept forever)."""
    lease_seconds: float = defaults.LEASE_SECONDS
    """How long a run's claim outlives its owner's last renewal (then another replica may take it)."""
    db_pool_size: int | None = None
    """Most connections to PostgreSQL (None: the backend's default); SQLite ignores it."""
