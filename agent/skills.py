"""Skills (the Agent Skills layout): folders with a SKILL.md the agent can read when it needs one.

Only each skill's name and description go into the system prompt, so many skills cost few tokens;
the agent reads a skill's full text through the ``load_skill`` tool. Skills are read from disk every
time (people edit them while the server runs), on a worker thread so the event loop never blocks on
file I/O. A malformed skill is skipped with a warning naming its file, never an error: one bad file
must not stop the agent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import yaml

from agent.errors import ToolCallError
from agent.tools.file_reading import read_small
from agent.tools.safe_fs import Missing, OutsideRoot, PathRefused, Session, WorkspaceRoot

logger = logging.getLogger(__name__)

SKILL_FILE = "SKILL.md"
MAX_SKILL_BYTES = 256 * 1024
"""A bigger SKILL.md is skipped: skills are read on every new trace, and a body is a tool result."""
MAX_SKILLS = 100
MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 500
"""What one skill may add to every system prompt and to agent_info."""
SKILL_READERS = 4
"""Threads reading skills at once (each new trace without a system prompt reads them all)."""

BASE_SYSTEM_PROMPT = (
    "You are an agent that completes tasks by using the tools available to you. "
    "Think about which tool helps, call it, and read its result before going on. "
    "Be concise. When you are done, say what you did and what you found."
)


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    body: str  # the SKILL.md text after the front matter
    path: Path


def _parse_skill(path: Path, text: str) -> Skill | None:
    """One SKILL.md's text, or None (with a warning naming the file) when it is malformed."""
    lines = text.lstrip("\ufeff").splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        logger.warning(
            "Skipping skill %s: it does not start with YAML front matter between '---' lines.", path
        )
        return None
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        logger.warning("Skipping skill %s: its front matter has no closing '---' line.", path)
        return None
    try:
        meta: Any = yaml.safe_load("".join(lines[1:end]))
    except yaml.YAMLError as exc:
        logger.warning("Skipping skill %s: its front matter is not valid YAML (%s).", path, exc)
        return None
    if not isinstance(meta, dict):
        logger.warning(
            "Skipping skill %s: its front matter must be a mapping with name and description.", path
        )
        return None
    missing = [
        key for key in ("name", "description") if not isinstance(meta.get(key), str) or not meta[key].strip()
    ]
    if missing:
        logger.warning(
            "Skipping skill %s: its front matter needs a non-empty %s.", path, " and ".join(missing)
        )
        return None
    body = "".join(lines[end + 1 :]).strip("\n")
    name = meta["name"].strip()
    if len(name) > MAX_NAME_CHARS:
        logger.warning("Skipping skill %s: its name is over %d characters.", path, MAX_NAME_CHARS)
        return None
    description = " ".join(meta["description"].split())
    if len(description) > MAX_DESCRIPTION_CHARS:
        description = description[: MAX_DESCRIPTION_CHARS - 1] + "…"
    return Skill(name=name, description=description, body=body, path=path)


def load_skills(skills_dir: str | Path | None) -> list[Skill]:
    """Every well-formed skill under ``skills_dir`` (one folder each), sorted by name.

    Read as the file tools read the workspace (``safe_fs``): a link may point within the skills folder,
    never out of it, and only regular files are read (a FIFO swapped in is refused, never waited on),
    at most MAX_SKILL_BYTES of them whatever ``stat`` said. A missing directory simply means no skills.
    Blocking: call it through ``read_skills`` from async code.
    """
    if skills_dir is None:
        return []
    root = Path(skills_dir).expanduser()
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    skills: dict[str, Skill] = {}
    with WorkspaceRoot(root).session(lambda: None) as folder:
        for name in names:
            path = root / name / SKILL_FILE
            text = _read_skill(folder, name, path)
            skill = _parse_skill(path, text) if text is not None else None
            if skill is None:
                continue
            if skill.name in skills:
                logger.warning(
                    "Skipping skill %s: the name %r is already used by %s.",
                    path,
                    skill.name,
                    skills[skill.name].path,
                )
                continue
            if len(skills) >= MAX_SKILLS:
                logger.warning(
                    "Skipping skill %s and any after it: at most %d skills are offered.", path, MAX_SKILLS
                )
                break
            skills[skill.name] = skill
    return sorted(skills.values(), key=lambda s: s.name)


def _read_skill(folder: Session, name: str, path: Path) -> str | None:
    """The text of ``<name>/SKILL.md`` in the skills folder; None (warned unless it is simply absent)."""
    try:
        found = folder.resolve([name, SKILL_FILE])
    except Missing:
        return None  # a file beside the skills, or a folder without a SKILL.md
    except OutsideRoot:
        logger.warning("Skipping skill %s: it leads outside the skills folder.", path)
        return None
    except (PathRefused, OSError) as exc:
        logger.warning("Skipping skill %s: it cannot be read (%s).", path, exc or type(exc).__name__)
        return None
    try:
        if not found.is_file:
            logger.warning("Skipping skill %s: it is not a regular file.", path)
            return None
        data = read_small(found.fd, found.st.st_size, MAX_SKILL_BYTES) if found.fd is not None else None
        if data is None:
            logger.warning("Skipping skill %s: it is over %d bytes.", path, MAX_SKILL_BYTES)
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("Skipping skill %s: it cannot be read (%s).", path, exc)
        return None
    finally:
        folder.close(found)


async def read_skills(skills_dir: str | Path | None) -> list[Skill]:
    """``load_skills`` on a worker thread of the skills' own, so the event loop keeps serving and a slow
    disk can never take the threads the server's own I/O needs; abandoned if the caller is cancelled."""
    return await anyio.to_thread.run_sync(load_skills, skills_dir, abandon_on_cancel=True, limiter=_READERS)


_READERS = anyio.CapacityLimiter(SKILL_READERS)  # anyio binds it to the event loop at its first use


def build_system_prompt(skills: Sequence[Skill], base: str = BASE_SYSTEM_PROMPT) -> str:
    """The base prompt, plus a Skills section listing each skill's name and description (if any)."""
    if not skills:
        return base
    listing = "\n".join(f"- {skill.name}: {skill.description}" for skill in skills)
    return (
        f"{base}\n\n## Skills\n"
        "These skills hold instructions for particular tasks. When one fits the task, call the "
        "`load_skill` tool with its name to read it in full before you start.\n"
        f"{listing}"
    )


async def skills_system_prompt(skills_dir: str | Path | None, base: str = BASE_SYSTEM_PROMPT) -> str:
    """The system prompt for a trace created without one, from the skills on disk right now."""
    return build_system_prompt(await read_skills(skills_dir), base)


class LoadSkillTool:
    """The built-in ``load_skill`` tool: returns a skill's full SKILL.md text (without front matter).

    The schema's enum of names comes from the skills seen last: those on disk when it was built (it is
    built at startup, so reading them then is fine) or at the last ``refresh``. ``call`` always reads the
    disk afresh, so an edited skill is served as it is now.
    """

    name = "load_skill"
    group: str | None = None
    read_only = True

    def __init__(self, skills_dir: str | Path | None, skills: Sequence[Skill] | None = None):
        self._skills_dir = skills_dir
        self._names = [skill.name for skill in (load_skills(skills_dir) if skills is None else skills)]

    @property
    def description(self) -> str:
        return "Read the full instructions of one of the skills listed in the system prompt, by its name."

    @property
    def input_schema(self) -> dict[str, Any]:
        name: dict[str, Any] = {"type": "string", "description": "The skill's name, as listed."}
        if self._names:
            name["enum"] = list(self._names)
        return {"type": "object", "properties": {"name": name}, "required": ["name"]}

    async def refresh(self) -> list[Skill]:
        """Re-read the skills (off the event loop) and remember their names for the schema."""
        skills = await read_skills(self._skills_dir)
        self._names = [skill.name for skill in skills]
        return skills

    async def call(self, arguments: dict[str, Any]) -> str:
        wanted = arguments.get("name")
        skills = await self.refresh()
        for skill in skills:
            if skill.name == wanted:
                return skill.body or f"(The skill {skill.name} has no text beyond its description.)"
        available = ", ".join(skill.name for skill in skills) or "none"
        raise ToolCallError(f"There is no skill named {wanted!r}. Available skills: {available}.")
