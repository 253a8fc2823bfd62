"""Recall: rank the lessons against a task with SQLite FTS5 and format them for a system prompt.

The markdown file stays the source of truth (people edit it by hand), so the index is a cache: an
in-memory FTS5 table rebuilt whenever the file's (mtime_ns, size) differs from the last build. It is
small (hundreds of lessons), so a full rebuild is simpler and safer than incremental updates. The
blocking sqlite work runs in a worker thread; plain ``sqlite3`` on ``:memory:`` holds no thread
of its own, so nothing outlives the process the way an unclosed aiosqlite connection would.
"""

from __future__ import annotations

import re
import sqlite3
import threading

import anyio

from agent.experiences.file import ExperienceFile
from agent.experiences.markdown import Lesson, parse

LESSONS_HEADING = "## Lessons from earlier traces"
MAX_QUERY_TOKENS = 48

_WORD = re.compile(r"\w+", re.UNICODE)
STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "done",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "get",
        "got",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "let",
        "me",
        "more",
        "most",
        "my",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "out",
        "over",
        "own",
        "please",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "use",
        "using",
        "very",
        "via",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
    ]
)


def build_match_query(text: str) -> str:
    """An FTS5 MATCH expression from free text: each word quoted, OR-ed; "" when nothing is left.

    Only ``\\w+`` runs survive tokenising, so quotes, parentheses, ``*``, ``:``, ``^`` and ``-`` can
    never reach FTS5 as syntax, and operators such as AND/NEAR become quoted words (or stop words).
    """
    tokens: list[str] = []
    for word in _WORD.findall(str(text or "").lower()):
        word = word.strip("_")
        if len(word) < 3 or word in STOP_WORDS or word in tokens or word.isdigit():
            continue
        tokens.append(word)
        if len(tokens) >= MAX_QUERY_TOKENS:
            break
    return " OR ".join(f'"{token}"' for token in tokens)


def format_lessons_block(lessons: list[Lesson]) -> str:
    """The system-prompt section for recalled lessons; "" when there are none."""
    if not lessons:
        return ""
    bullets = "\n".join(f"- {lesson.text}" for lesson in lessons)
    return (
        f"{LESSONS_HEADING}\n"
        "Reflections on earlier traces produced these lessons. Apply the ones that fit this task; "
        "ignore any that do not.\n\n"
        f"{bullets}\n"
    )


class LessonIndex:
    """A full-text index over the experiences file's lessons, rebuilt when the file changes."""

    def __init__(self, file: ExperienceFile):
        self.file = file
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._conn.execute(
            "CREATE VIRTUAL TABLE lessons USING fts5(text, tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        self._lessons: list[Lesson] = []
        self._built_key: tuple[int, int] | None = None
        self._stale = True
        self._lock = anyio.Lock()
        self._thread_lock = threading.Lock()  # the connection is shared by worker threads

    def invalidate(self) -> None:
        """Force a rebuild on next use: our own writes can land within one mtime tick."""
        self._stale = True

    async def lessons(self) -> list[Lesson]:
        """All lessons in file order, as of the current file."""
        async with self._lock:
            await self._refresh()
            return list(self._lessons)

    async def search(self, query: str, limit: int) -> list[Lesson]:
        """The ``limit`` lessons best matching ``query`` by bm25; never raises on odd user text."""
        if limit <= 0:
            return []
        match = build_match_query(query)
        if not match:
            return []
        async with self._lock:
            await self._refresh()
            rows = await anyio.to_thread.run_sync(self._search_sync, match, limit)
            return [self._lessons[row] for row in rows if 0 <= row < len(self._lessons)]

    def close(self) -> None:
        with self._thread_lock:
            self._conn.close()

    async def _refresh(self) -> None:
        key = await self.file.stat_key()
        if key == self._built_key and not self._stale:
            return
        self._stale = False  # cleared before reading: a write landing meanwhile sets it again
        try:
            lessons = parse(await self.file.read_text()).lessons()
            await anyio.to_thread.run_sync(self._rebuild_sync, lessons)
        except BaseException:
            self._stale = True  # a cancelled or failed rebuild must not pass for a good one
            raise
        self._lessons, self._built_key = lessons, key

    def _rebuild_sync(self, lessons: list[Lesson]) -> None:
        with self._thread_lock, self._conn:
            self._conn.execute("DELETE FROM lessons")
            self._conn.executemany(
                "INSERT INTO lessons(rowid, text) VALUES (?, ?)",
                [(position, lesson.text) for position, lesson in enumerate(lessons)],
            )

    def _search_sync(self, match: str, limit: int) -> list[int]:
        with self._thread_lock:
            try:
                cursor = self._conn.execute(
                    # newer lessons win ties: later reflections tend to supersede earlier ones
                    "SELECT rowid FROM lessons WHERE lessons MATCH ? ORDER BY bm25(lessons), rowid DESC LIMIT ?",
                    (match, limit),
                )
                return [row[0] for row in cursor.fetchall()]
            except sqlite3.Error:
                return []  # belt and braces: recall must never break trace creation
