"""Every default of the product in one place: settings, engine, providers, tools and docs read these.

Copies drift (the tool timeout once read 60, 120 and 300 in three modules), so nothing else spells a
default out; a setting's help text and the README quote these names.
"""

from __future__ import annotations

# -- runs -------------------------------------------------------------------------------------------
MODEL = "openai:gpt-4o"
TEMPERATURE = 0.3
MAX_ITERATIONS = 200
MAX_ITERATIONS_LIMIT = 10_000
TOOL_TIMEOUT_SECONDS = 120.0
MAX_TOOL_RESULT_CHARS = 100_000

# -- model providers --------------------------------------------------------------------------------
LLM_TIMEOUT_SECONDS = 120.0
LLM_RETRIES = 2
ANTHROPIC_MAX_TOKENS = 4096

# -- experiences ------------------------------------------------------------------------------------
EXPERIENCE_RECALL = 5
EXPERIENCE_BUDGET = 100
REFLECTION_SETTLE_SECONDS = 15.0
"""get_experiences waits this long at most for automatic reflections under way (``reflect=true``), so a host
that read a trace's answer and asks for its lessons at once finds them."""

# -- hosts ------------------------------------------------------------------------------------------
MAX_WAIT_SECONDS = 45.0
"""The longest a single call blocks unless the server is configured otherwise (hosts time out at 60 s)."""
SUGGESTED_WAIT_SECONDS = 30
"""What the server's texts suggest for wait_seconds: well inside the hosts' 60 s timeout (and --max-wait)."""
PROGRESS_INTERVAL_SECONDS = 8.0
"""A waiting call sends progress at least this often (a margin under the promised 10 s), so clients that
reset their timeout on progress wait on."""

# -- processes --------------------------------------------------------------------------------------
IDLE_EXIT_SECONDS = 600.0
EOF_DRAIN_SECONDS = 60.0
"""After a client's end of input, how long requests it already sent may take to be answered (a wait is at
most --max-wait): ``printf '…create_trace…' | agent-trace-mcp`` gets its answer and starts its run."""
LEASE_SECONDS = 20.0
"""A run's claim lapses this long after its owner last renewed it: then the owner counts as dead."""
LEASE_RENEW_SECONDS = 5.0
PG_POOL_SIZE = 10
"""PostgreSQL connections each process keeps."""
FEED_POLL_SECONDS = 0.1
"""How often a process looks for changes other processes stored (a cheap ``PRAGMA data_version`` on SQLite)."""
CHANGE_RETENTION_SECONDS = 600.0
"""How long the change log keeps a row: a process whose feed falls further behind than this misses it."""
PRUNE_CHANGES_BATCH = 10_000
PRUNE_TRACES_BATCH = 500
"""Old traces are deleted this many per transaction, so a first prune of a large store never holds the
write lock for long."""

# -- context ----------------------------------------------------------------------------------------
CONTEXT_TOKENS = 128_000
