"""Parse the experiences markdown into sections and lessons, and render new sections.

The file is the source of truth and people edit it by hand, so parsing is forgiving: it never
raises, keeps whatever precedes the first ``## `` heading as the preamble (the ``# Experiences``
title), and turns whatever a section says into lessons rather than losing it. Rendering produces
the canonical form, so an appended section parses back to exactly the lessons given.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

from pydantic import BaseModel, Field

TITLE = "# Experiences"
WHEN_FORMAT = "%Y-%m-%d %H:%M"

_HEADING = re.compile(r"^##(?:[ \t]+(?P<rest>.*?))?[ \t]*$")
_RULE = re.compile(r"^\s*([-*_])(?:\s*\1){2,}\s*$")
_TRACE_ID = re.compile(r"^(?P<id>[0-9a-fA-F]{32})\b")
_WHEN = re.compile(r"\((?P<when>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?)[^)]*\)\s*$")
_BULLET = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])(?:\s+(?P<text>.*))?$")
_META = re.compile(r"^_(?P<key>[a-z][a-z ]*):\s*(?P<value>.*?)_\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
META_KEYS = frozenset({"source", "dropped", "merged", "left out"})
"""Italic ``_key: value_`` lines with these keys are section metadata, not lessons."""


class Lesson(BaseModel):
    """One transferable lesson, with where it came from; ``id`` is stable while its text and heading are."""

    id: str
    text: str
    heading: str
    trace_id: str | None = None
    when: str | None = None
    source: str | None = None


class Section(BaseModel):
    """One ``## `` section as found in the file; ``raw`` lets an untouched section be written back as is."""

    heading: str
    trace_id: str | None = None
    when: str | None = None
    source: str | None = None
    lessons: list[Lesson] = Field(default_factory=list)
    raw: str = ""


class ParsedFile(BaseModel):
    preamble: str = ""
    sections: list[Section] = Field(default_factory=list)

    def lessons(self) -> list[Lesson]:
        return [lesson for section in self.sections for lesson in section.lessons]


def normalize(text: str) -> str:
    """One line, single spaces: lessons are short, and this makes render→parse an exact round trip."""
    return " ".join(str(text).split())


def lesson_id(heading: str, text: str) -> str:
    """A short hash of heading + text: stable across re-parses, changes when either is edited."""
    return hashlib.sha1(f"{heading}\n{text}".encode("utf-8", "replace")).hexdigest()[:10]


def format_when(when: datetime) -> str:
    return when.strftime(WHEN_FORMAT)


def render_section(
    heading: str,
    lessons: list[str],
    when: datetime | str | None,
    source: str | None,
    notes: dict[str, str] | None = None,
) -> str:
    """The canonical text of a section: heading with date, ``_source_`` line, one bullet per lesson."""
    stamp = format_when(when) if isinstance(when, datetime) else when
    head = f"## {normalize(heading)}" + (f" ({stamp})" if stamp else "")
    lines = [head]
    meta = {"source": source or "", **(notes or {})}
    lines += [f"_{key}: {normalize(value)}_" for key, value in meta.items() if normalize(value or "")]
    lines.append("")
    lines += [f"- {normalize(text)}" for text in lessons if normalize(text)]
    return "\n".join(lines) + "\n"


def parse(text: str) -> ParsedFile:
    """Split the file into preamble and sections; never raises, whatever the input."""
    try:
        return _parse(text)
    except Exception:
        return ParsedFile(preamble=str(text) if isinstance(text, str) else "")


def _parse(text: str) -> ParsedFile:
    preamble, chunks = _chunks(text)
    seen: dict[str, int] = {}  # ids are unique in the file even when a section is repeated verbatim
    return ParsedFile(preamble=preamble, sections=[_section(rest, body, seen) for rest, body in chunks])


def split(text: str) -> tuple[str, list[str]]:
    """The preamble and each section's raw text, without parsing lessons: cheap, for bounded views."""
    try:
        preamble, chunks = _chunks(text)
    except Exception:
        return (str(text) if isinstance(text, str) else ""), []
    return preamble, ["\n".join(lines).strip("\n") + "\n" for _, lines in chunks]


def parse_section(raw: str, seen: dict[str, int] | None = None) -> Section | None:
    """One section's raw text (as ``split`` gives it) parsed; None when it is not a section."""
    try:
        _, chunks = _chunks(raw)
        if not chunks:
            return None
        rest, lines = chunks[0]
        for _, more in chunks[1:]:  # a cut section can hold no further heading, but be forgiving
            lines += more
        return _section(rest, lines, {} if seen is None else seen)
    except Exception:
        return None


def _chunks(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The preamble, then (heading rest, lines) per ``## `` section; headings inside fences do not count."""
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8", "replace") if isinstance(text, (bytes, bytearray)) else str(text)
    text = text.replace("\x00", "")
    preamble: list[str] = []
    chunks: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            chunks.append(((heading.group("rest") or "").rstrip("# \t"), [line]))
        elif chunks:
            chunks[-1][1].append(line)
        else:
            preamble.append(line)
    return "\n".join(preamble).strip("\n"), chunks


def cut(text: str, max_chars: int) -> str:
    """``text`` if it is short enough, else its start (at a word break when one is near) and a marker.

    The marker names the original length, so a reader sees that something was cut and how much.
    """
    if len(text) <= max_chars:
        return text
    marker = f" […cut from {len(text):,} characters]"
    room = max(0, max_chars - len(marker))
    head = text[:room]
    space = head.rfind(" ")
    if space >= room * 0.8:
        head = head[:space]
    return (head.rstrip() + marker)[:max_chars]


def _section(rest: str, lines: list[str], seen: dict[str, int]) -> Section:
    when_match = _WHEN.search(rest)
    when = when_match.group("when").replace("T", " ")[:16] if when_match else None
    label = rest[: when_match.start()].strip() if when_match else rest.strip()
    id_match = _TRACE_ID.match(label)
    trace_id = id_match.group("id").lower() if id_match else None
    heading = normalize(label) or "(untitled)"
    source, texts = _body(lines[1:])
    lessons = []
    for text in texts:
        base = lesson_id(normalize(rest), text)
        seen[base] = seen.get(base, 0) + 1
        ident = base if seen[base] == 1 else f"{base}-{seen[base]}"
        lessons.append(
            Lesson(id=ident, text=text, heading=heading, trace_id=trace_id, when=when, source=source)
        )
    raw = "\n".join(lines).strip("\n") + "\n"
    return Section(heading=heading, trace_id=trace_id, when=when, source=source, lessons=lessons, raw=raw)


def bullet_items(text: str) -> list[str]:
    """Only the bullet lessons of a markdown fragment (a model's reflection), prose ignored."""
    try:
        _, items = _items(str(text or "").splitlines())
    except Exception:
        return []
    return [t for kind, t in items if kind == "bullet" and t]


def _body(lines: list[str]) -> tuple[str | None, list[str]]:
    """Bullets are lessons (indented lines continue them); prose paragraphs are lessons too.

    The issue asks for paragraphs as lessons when a section has no bullets; we also keep prose that
    sits beside bullets as lessons, because consolidation rewrites the file from lessons and must
    not lose what a person wrote by hand.
    """
    source, items = _items(lines)
    return source, [text for _, text in items if text]


def _items(lines: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The ``_source:_`` value and the (kind, text) items of a section body, kind "bullet" or "prose"."""
    source: str | None = None
    items: list[tuple[str, list[str]]] = []
    current: list[str] | None = None  # the bullet or paragraph being collected
    last_bullet: list[str] | None = None  # an indented line after a blank still belongs to it
    in_fence = False
    for line in lines:
        fence = bool(_FENCE.match(line))
        stripped = line.strip()
        meta = None if in_fence else _META.match(stripped)
        bullet = None if in_fence else _BULLET.match(line)
        if fence:
            in_fence = not in_fence
        if meta and current is None and meta.group("key") in META_KEYS:
            if meta.group("key") == "source" and source is None:
                source = normalize(meta.group("value"))
            continue
        if not stripped or (_RULE.match(line) and not in_fence):
            current = None
        elif bullet:
            text = (bullet.group("text") or "").strip()
            current = last_bullet = [text] if text else None  # a lone "-" holds nothing
            if current is not None:
                items.append(("bullet", current))
        elif stripped.startswith("#") and not in_fence:
            current = last_bullet = None  # a sub-heading organises lessons, it is not one
        elif current is not None:
            current.append(stripped)
        elif last_bullet is not None and line[:1].isspace():
            current = last_bullet
            current.append(stripped)
        else:
            current, last_bullet = [stripped], None
            items.append(("prose", current))
    return source, [(kind, normalize(" ".join(parts))) for kind, parts in items]
