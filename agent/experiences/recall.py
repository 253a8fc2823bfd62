"""Recall: rank the lessons against a task with SQLite FTS5 and format them for a system prompt.

The markdown file stays the source of truth (people edit it by hand), so the index is a cache: an
in-memory FTS5 table rebuilt whenever the file's key (mtime_ns, size, inode) differs from the last
build. It is small (hundreds of lessons), so a full rebuild is simpler and safer than incremental
updates. What it holds is bounded whatever the file holds (see ``limits``): the newest part of the
file, each lesson cut to a short length, so one huge lesson can never reach a system prompt. The
blocking parse and sqlite work run in a worker thread; plain ``sqlite3`` on ``:memory:`` holds no
thread of its own, so nothing outlives the process the way an unclosed aiosqlite connection would.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections import deque

import anyio

from agent.experiences.file import ExperienceFile, FileKey
from agent.experiences.limits import (
    MAX_INDEXED_LESSONS,
    MAX_LABEL_CHARS,
    MAX_LESSON_CHARS,
    MAX_RECALL_CANDIDATES,
    MAX_RECALL_CHARS,
    MAX_SCAN_BYTES,
    MAX_SECTION_SCAN_CHARS,
    NEAR_DUPLICATE_JACCARD,
)
from agent.experiences.markdown import Lesson, cut, parse_section, split

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
    for found in _WORD.finditer(str(text or "")):  # lazily: a huge task text stops at the cap
        word = found.group().lower().strip("_")
        if len(word) < 3 or word in STOP_WORDS or word in tokens or word.isdigit():
            continue
        tokens.append(word)
        if len(tokens) >= MAX_QUERY_TOKENS:
            break
    return " OR ".join(f'"{token}"' for token in tokens)


def word_set(text: str) -> frozenset[str]:
    """The words of a lesson, case and a plural "s" folded: what near-duplicate checks compare."""
    words = (w.lower().strip("_") for w in _WORD.findall(text))
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w)


def near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    """Word-set Jaccard at or above ``NEAR_DUPLICATE_JACCARD``: the two lessons say the same thing."""
    if not a or not b:
        return a == b
    return len(a & b) / len(a | b) >= NEAR_DUPLICATE_JACCARD


def pick(ranked: list[Lesson], limit: int, max_chars: int) -> list[Lesson]:
    """Best first, up to ``limit`` lessons and ``max_chars`` of text, skipping near-duplicates of a pick."""
    chosen: list[Lesson] = []
    chosen_words: list[frozenset[str]] = []
    used = 0
    for lesson in ranked:
        if len(chosen) >= limit:
            break
        if used + len(lesson.text) > max_chars:
            continue  # a shorter one further down may still fit
        words = word_set(lesson.text) or frozenset([lesson.text.casefold()])
        if any(near_duplicate(words, other) for other in chosen_words):
            continue
        chosen.append(lesson)
        chosen_words.append(words)
        used += len(lesson.text)
    return chosen


def bounded_lessons(text: str) -> tuple[list[Lesson], int]:
    """The newest ``MAX_INDEXED_LESSONS`` lessons of ``text`` in file order, each cut short, and the
    count of all lessons it holds; a section larger than any we write is parsed from its start only."""
    _, sections = split(text)
    kept: deque[Lesson] = deque(maxlen=MAX_INDEXED_LESSONS)
    seen: dict[str, int] = {}  # shared across sections, so ids match a whole-file parse
    total = 0
    for raw in sections:
        section = parse_section(raw[:MAX_SECTION_SCAN_CHARS], seen)
        if section is None:
            continue
        total += len(section.lessons)
        kept.extend(bounded_lesson(lesson) for lesson in section.lessons)
    return list(kept), total


def bounded_lesson(lesson: Lesson) -> Lesson:
    """A lesson as recall shows it: its text and labels cut to their limits (a hand-edited file may hold more)."""
    if len(lesson.text) <= MAX_LESSON_CHARS and len(lesson.heading) <= MAX_LABEL_CHARS:
        return lesson
    return lesson.model_copy(
        update={
            "text": cut(lesson.text, MAX_LESSON_CHARS),
            "heading": cut(lesson.heading, MAX_LABEL_CHARS),
            "source": cut(lesson.source, MAX_LABEL_CHARS) if lesson.source else lesson.source,
        }
    )


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
    """A full-text index over the experiences file's lessons (bounded), rebuilt when the file changes."""

    def __init__(self, file: ExperienceFile):
        self.file = file
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._conn.execute(
            "CREATE VIRTUAL TABLE lessons USING fts5(text, tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        self._lessons: list[Lesson] = []
        self._total = 0
        self._built_key: FileKey = None
        self._stale = True
        self._lock = anyio.Lock()
        self._thread_lock = threading.Lock()  # the connection is shared by worker threads

    def invalidate(self) -> None:
        """Force a rebuild on next use: our own writes can land within one mtime tick."""
        self._stale = True

    async def lessons(self) -> list[Lesson]:
        """The lessons in file order, as of the current file (the newest ``MAX_INDEXED_LESSONS``, cut short)."""
        async with self._lock:
            await self._refresh()
            return list(self._lessons)

    async def count(self) -> int:
        """How many lessons the file holds (in its newest ``MAX_SCAN_BYTES``)."""
        async with self._lock:
            await self._refresh()
            return self._total

    async def search(self, query: str, limit: int, max_chars: int = MAX_RECALL_CHARS) -> list[Lesson]:
        """The lessons best matching ``query`` by bm25, near-duplicates skipped, at most ``limit`` of them
        and ``max_chars`` of text; never raises on odd user text."""
        if limit <= 0 or max_chars <= 0:
            return []
        match = build_match_query(query)
        if not match:
            return []
        async with self._lock:
            await self._refresh()
            lessons = self._lessons
            rows = await anyio.to_thread.run_sync(self._search_sync, match, max(limit, MAX_RECALL_CANDIDATES))
            ranked = [lessons[row] for row in rows if 0 <= row < len(lessons)]
            return pick(ranked, limit, max_chars)

    def close(self) -> None:
        with self._thread_lock:
            self._conn.close()

    async def _refresh(self) -> None:
        key = await self.file.stat_key()
        if key == self._built_key and not self._stale:
            return
        self._stale = False  # cleared before reading: a write landing meanwhile sets it again
        try:
            window = await self.file.read_window(MAX_SCAN_BYTES)
            lessons, total = await anyio.to_thread.run_sync(self._rebuild_sync, window.text)
        except BaseException:
            self._stale = True  # a cancelled or failed rebuild must not pass for a good one
            raise
        # the key of what was read, not of the earlier stat: a write in between is seen next time
        self._lessons, self._total, self._built_key = lessons, total, window.key

    def _rebuild_sync(self, text: str) -> tuple[list[Lesson], int]:
        lessons, total = bounded_lessons(text)
        self._fill_sync(lessons)
        return lessons, total

    def _fill_sync(self, lessons: list[Lesson]) -> None:
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
