"""Workspace tools: behaviour, limits and, above all, containment (``..``, absolute, symlinks, siblings)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import jsonschema
import pytest

from agent.errors import ToolCallError
from agent.tools import files
from agent.tools.files import READ_CAP_BYTES, workspace_tools
from agent.tools.registry import Tool, ToolRegistry

pytestmark = pytest.mark.anyio


@pytest.fixture
def root(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "src" / "pkg").mkdir(parents=True)
    (work / "src" / "main.py").write_text("import os\nprint('Hello World')\n")
    (work / "src" / "pkg" / "util.py").write_text("def hello():\n    return 'hello'\n")
    (work / "README.md").write_text("# Demo\nSay hello.\n")
    for skipped in (".git", "__pycache__", "node_modules", ".venv"):
        (work / skipped).mkdir()
        (work / skipped / "hidden.txt").write_text("hello from a skipped dir\n")
    # Outside the workspace: a sibling whose name starts with the root's name, and a plain directory.
    (tmp_path / "work_extra").mkdir()
    (tmp_path / "work_extra" / "x.txt").write_text("hello secret sibling\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("hello secret outside\n")
    return work


@pytest.fixture
def tools(root: Path) -> dict[str, Tool]:
    return {t.name: t for t in workspace_tools(root)}


async def call(tools: dict[str, Tool], name: str, **arguments: Any) -> str:
    return await tools[name].call(arguments)


async def refused(tools: dict[str, Tool], name: str, **arguments: Any) -> str:
    with pytest.raises(ToolCallError) as info:
        await tools[name].call(arguments)
    return str(info.value)


# --- shape -------------------------------------------------------------------------------------------


def test_three_tools_satisfy_the_protocol(root: Path) -> None:
    tools = workspace_tools(str(root))
    assert [t.name for t in tools] == ["list_files", "read_file", "search_files"]
    for tool in tools:
        assert isinstance(tool, Tool)
        assert tool.group is None
        assert 20 < len(tool.description) < 300
    assert ToolRegistry(tools).names() == ["list_files", "read_file", "search_files"]


def test_schemas_are_valid_and_every_property_is_described(root: Path) -> None:
    for tool in workspace_tools(root):
        schema = tool.input_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        for name, prop in schema["properties"].items():
            assert prop.get("description", "").strip(), f"{tool.name}.{name} has no description"
            if "default" in prop:  # defaults must themselves be valid
                jsonschema.Draft202012Validator({**prop}).validate(prop["default"])
    by_name = {t.name: t.input_schema for t in workspace_tools(root)}
    assert by_name["read_file"]["required"] == ["path"]
    assert by_name["search_files"]["required"] == ["pattern"]
    assert by_name["list_files"]["properties"]["max_entries"]["maximum"] == 1000
    assert by_name["search_files"]["properties"]["max_results"]["maximum"] == 500


async def test_arguments_are_checked(tools: dict[str, Tool]) -> None:
    assert "Unknown argument(s) 'pth'" in await refused(tools, "list_files", pth="src")
    assert "needs the 'path' argument" in await refused(tools, "read_file")
    assert "must be a integer" in await refused(tools, "read_file", path="README.md", offset="2")
    assert "must be a boolean" in await refused(tools, "list_files", recursive="yes")
    assert "at least 1" in await refused(tools, "list_files", max_entries=0)
    assert "must not be empty" in await refused(tools, "search_files", pattern="")
    # Above the maximum is clamped, not refused; an integral float is accepted.
    assert await call(tools, "list_files", max_entries=5000)
    assert await call(tools, "read_file", path="README.md", offset=2.0) == "Say hello.\n"


# --- list_files ---------------------------------------------------------------------------------------


async def test_list_root_is_sorted_with_directories_marked(tools: dict[str, Tool]) -> None:
    out = await call(tools, "list_files")
    # Not recursing: the skipped directories are still shown as entries.
    assert out.splitlines() == [".git/", ".venv/", "README.md", "__pycache__/", "node_modules/", "src/"]


async def test_list_subdirectory_paths_are_relative_to_root(tools: dict[str, Tool]) -> None:
    assert (await call(tools, "list_files", path="src")).splitlines() == ["src/main.py", "src/pkg/"]
    assert (await call(tools, "list_files", path="src/pkg/../pkg")).splitlines() == ["src/pkg/util.py"]


async def test_list_recursive_skips_noise_directories(tools: dict[str, Tool]) -> None:
    out = await call(tools, "list_files", recursive=True)
    assert out.splitlines() == ["README.md", "src/", "src/main.py", "src/pkg/", "src/pkg/util.py"]


async def test_list_truncation_is_announced(tools: dict[str, Tool]) -> None:
    lines = (await call(tools, "list_files", recursive=True, max_entries=2)).splitlines()
    assert lines[:2] == ["README.md", "src/"]
    assert len(lines) == 3 and "truncated at 2 entries" in lines[2]
    assert "truncated" not in await call(tools, "list_files", recursive=True, max_entries=5)


async def test_list_empty_directory(root: Path, tools: dict[str, Tool]) -> None:
    (root / "empty").mkdir()
    assert await call(tools, "list_files", path="empty") == "Directory 'empty' is empty."


async def test_list_refuses_a_file_and_a_missing_path(tools: dict[str, Tool]) -> None:
    msg = await refused(tools, "list_files", path="README.md")
    assert "'README.md' is a file" in msg and "read_file" in msg
    msg = await refused(tools, "list_files", path="nope")
    assert "no file or directory 'nope'" in msg and "list_files" in msg


# --- read_file ----------------------------------------------------------------------------------------


async def test_read_whole_file(tools: dict[str, Tool]) -> None:
    assert await call(tools, "read_file", path="src/main.py") == "import os\nprint('Hello World')\n"


async def test_read_unicode_round_trip(root: Path, tools: dict[str, Tool]) -> None:
    text = "héllo wörld\n日本語のテキスト\nemoji 🚀 and RTL שלום\n"
    (root / "uni.txt").write_text(text, encoding="utf-8")
    assert await call(tools, "read_file", path="uni.txt") == text
    (root / "uni name é.txt").write_text(text, encoding="utf-8")
    assert await call(tools, "read_file", path="uni name é.txt") == text


async def test_read_invalid_utf8_is_replaced(root: Path, tools: dict[str, Tool]) -> None:
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert await call(tools, "read_file", path="latin1.txt") == "caf\ufffd\n"


async def test_read_offset_and_limit(root: Path, tools: dict[str, Tool]) -> None:
    (root / "lines.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    out = await call(tools, "read_file", path="lines.txt", offset=3, limit=2)
    body, note = out.rsplit("\n", 1)
    assert body == "line 3\nline 4"
    assert "lines 3-4" in note and "offset=5" in note
    assert await call(tools, "read_file", path="lines.txt", offset=9) == "line 9\nline 10\n"
    assert await call(tools, "read_file", path="lines.txt", offset=9, limit=2) == "line 9\nline 10\n"
    msg = await refused(tools, "read_file", path="lines.txt", offset=12)
    assert "only 10 line(s)" in msg and "offset 12" in msg


async def test_read_default_limit_is_2000_lines(root: Path, tools: dict[str, Tool]) -> None:
    (root / "many.txt").write_text("".join(f"{i}\n" for i in range(1, 2501)))
    body, note = (await call(tools, "read_file", path="many.txt")).rsplit("\n", 1)
    assert body.splitlines() == [str(i) for i in range(1, 2001)]
    assert "lines 1-2000" in note and "offset=2001" in note


async def test_read_last_line_without_newline(root: Path, tools: dict[str, Tool]) -> None:
    (root / "nonl.txt").write_text("a\nb")
    assert await call(tools, "read_file", path="nonl.txt", offset=2) == "b"
    assert "only 2 line(s)" in await refused(tools, "read_file", path="nonl.txt", offset=3)


async def test_read_empty_file(root: Path, tools: dict[str, Tool]) -> None:
    (root / "empty.txt").write_text("")
    assert await call(tools, "read_file", path="empty.txt") == "File 'empty.txt' is empty."


async def test_read_byte_cap(root: Path, tools: dict[str, Tool]) -> None:
    line = "x" * 99 + "\n"  # 100 bytes a line
    (root / "big.txt").write_text(line * 3000)  # 300,000 bytes > 256 KiB
    out = await call(tools, "read_file", path="big.txt", limit=5000)  # the byte cap bites before the limit
    body, note = out.rsplit("\n", 1)
    shown = READ_CAP_BYTES // 100
    assert body + "\n" == line * shown
    assert "256 KiB" in note and f"offset={shown + 1}" in note
    rest = await call(tools, "read_file", path="big.txt", offset=shown + 1, limit=5000)
    assert rest == line * (3000 - shown)


async def test_read_single_line_longer_than_cap(root: Path, tools: dict[str, Tool]) -> None:
    (root / "long.txt").write_text("y" * (READ_CAP_BYTES + 10))
    out = await call(tools, "read_file", path="long.txt")
    body, note = out.rsplit("\n", 1)
    assert body == "y" * READ_CAP_BYTES
    assert "longer than the 256 KiB" in note


async def test_a_line_cut_at_the_cap_ends_on_a_whole_character(root: Path, tools: dict[str, Tool]) -> None:
    (root / "wide.txt").write_text("中" * (READ_CAP_BYTES // 3 + 10), encoding="utf-8")  # 3 bytes each
    body, note = (await call(tools, "read_file", path="wide.txt")).rsplit("\n", 1)
    assert body == "中" * (READ_CAP_BYTES // 3) and "\ufffd" not in body  # 262,144 is no multiple of 3
    assert "longer than the 256 KiB" in note


async def test_read_refuses_binary(root: Path, tools: dict[str, Tool]) -> None:
    (root / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    msg = await refused(tools, "read_file", path="blob.bin")
    assert "'blob.bin'" in msg and "binary" in msg
    # A NUL after the sniffed head is still caught.
    (root / "late.bin").write_bytes(b"a" * 10000 + b"\n\x00\n")
    assert "NUL" in await refused(tools, "read_file", path="late.bin")


async def test_read_refuses_directory_and_missing(tools: dict[str, Tool]) -> None:
    msg = await refused(tools, "read_file", path="src")
    assert "'src' is a directory" in msg and "list_files" in msg
    msg = await refused(tools, "read_file", path="src/missing.py")
    assert "no file or directory 'src/missing.py'" in msg


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_read_refuses_fifo_instead_of_blocking(root: Path, tools: dict[str, Tool]) -> None:
    os.mkfifo(root / "pipe")
    assert "not a regular file" in await refused(tools, "read_file", path="pipe")


# --- search_files -------------------------------------------------------------------------------------


async def test_search_case_insensitive_by_default(tools: dict[str, Tool]) -> None:
    out = await call(tools, "search_files", pattern="HELLO")
    lines = out.splitlines()
    assert lines[0] == "4 match(es) in 3 file(s) for 'HELLO' under '.':"
    assert lines[1:] == [
        "README.md:2: Say hello.",
        "src/main.py:2: print('Hello World')",
        "src/pkg/util.py:1: def hello():",
        "src/pkg/util.py:2: return 'hello'",
    ]
    assert "skipped dir" not in out and "secret" not in out


async def test_search_case_sensitive_and_under_path(tools: dict[str, Tool]) -> None:
    out = await call(tools, "search_files", pattern="Hello", case_sensitive=True, path="src")
    assert out.splitlines()[1:] == ["src/main.py:2: print('Hello World')"]
    out = await call(tools, "search_files", pattern="hello", path="src/pkg/util.py")
    assert out.splitlines()[1:] == ["src/pkg/util.py:1: def hello():", "src/pkg/util.py:2: return 'hello'"]


async def test_search_is_plain_text_not_regex(root: Path, tools: dict[str, Tool]) -> None:
    (root / "re.txt").write_text("a.*b\naxxb\n")
    out = await call(tools, "search_files", pattern="a.*b")
    assert out.splitlines()[1:] == ["re.txt:1: a.*b"]


async def test_search_no_matches(tools: dict[str, Tool]) -> None:
    assert await call(tools, "search_files", pattern="zebra") == "No matches for 'zebra' under '.'."
    out = await call(tools, "search_files", pattern="zebra", path="src")
    assert out == "No matches for 'zebra' under 'src'."


async def test_search_truncation(root: Path, tools: dict[str, Tool]) -> None:
    (root / "many.txt").write_text("needle\n" * 20)
    out = await call(tools, "search_files", pattern="needle", max_results=5)
    lines = out.splitlines()
    assert "First 5 matches" in lines[0] and "truncated" in lines[0]
    assert lines[1:] == [f"many.txt:{i}: needle" for i in range(1, 6)]
    out = await call(tools, "search_files", pattern="needle", max_results=20)
    assert out.splitlines()[0].startswith("20 match(es) in 1 file(s)") and "truncated" not in out


async def test_search_trims_long_lines_keeping_the_match(root: Path, tools: dict[str, Tool]) -> None:
    (root / "long.txt").write_text("a" * 1000 + "NEEDLE" + "b" * 1000 + "\n" + "short needle\n")
    lines = (await call(tools, "search_files", pattern="needle")).splitlines()
    first = lines[1].split(": ", 1)[1]
    assert lines[1].startswith("long.txt:1: ")
    assert "NEEDLE" in first and len(first) <= 302  # 300 chars plus the two ellipses
    assert lines[2] == "long.txt:2: short needle"


async def test_search_unicode(root: Path, tools: dict[str, Tool]) -> None:
    (root / "uni.txt").write_text("Grüße aus Köln\n日本語のテキスト\n", encoding="utf-8")
    out = await call(tools, "search_files", pattern="KÖLN")
    assert out.splitlines()[1:] == ["uni.txt:1: Grüße aus Köln"]
    out = await call(tools, "search_files", pattern="テキスト")
    assert out.splitlines()[1:] == ["uni.txt:2: 日本語のテキスト"]


async def test_search_skips_binary_and_big_files(root: Path, tools: dict[str, Tool]) -> None:
    (root / "blob.bin").write_bytes(b"needle\x00needle\n")
    (root / "huge.txt").write_bytes(b"needle\n" + b"z" * (1024 * 1024))
    out = await call(tools, "search_files", pattern="needle")
    assert out.startswith("No matches for 'needle' under '.'.")
    assert "Skipped 1 file(s) over 1 MiB" in out


async def test_search_refuses_multiline_pattern_and_missing_path(tools: dict[str, Tool]) -> None:
    assert "single line" in await refused(tools, "search_files", pattern="a\nb")
    assert "no file or directory 'gone'" in await refused(tools, "search_files", pattern="x", path="gone")


# --- containment --------------------------------------------------------------------------------------

ALL_PATH_CALLS = [
    ("list_files", {}),
    ("read_file", {}),
    ("search_files", {"pattern": "hello"}),
]


@pytest.mark.parametrize(("name", "extra"), ALL_PATH_CALLS)
@pytest.mark.parametrize(
    "path", ["..", "../outside/secret.txt", "src/../../outside", "../work_extra/x.txt", "../work_extra"]
)
async def test_dotdot_escapes_are_refused(tools: dict[str, Tool], name: str, extra: dict, path: str) -> None:
    msg = await refused(tools, name, path=path, **extra)
    assert "outside the workspace" in msg and path in msg


@pytest.mark.parametrize(("name", "extra"), ALL_PATH_CALLS)
async def test_absolute_paths_are_refused(root: Path, tools: dict[str, Tool], name: str, extra: dict) -> None:
    for path in ("/etc/passwd", str(root / "README.md"), str(root)):
        msg = await refused(tools, name, path=path, **extra)
        assert "is absolute" in msg and "relative" in msg


async def test_sibling_with_same_prefix_is_not_inside(tmp_path: Path, tools: dict[str, Tool]) -> None:
    """`work_extra` starts with `work` as a string but is not inside it."""
    assert (tmp_path / "work_extra" / "x.txt").exists()
    assert "outside the workspace" in await refused(tools, "read_file", path="../work_extra/x.txt")
    (tmp_path / "work" / "sib").symlink_to(tmp_path / "work_extra")
    assert "outside the workspace" in await refused(tools, "read_file", path="sib/x.txt")


async def test_missing_path_outside_does_not_reveal_existence(tools: dict[str, Tool]) -> None:
    assert "outside the workspace" in await refused(tools, "read_file", path="../nope.txt")


async def test_dotdot_staying_inside_is_fine(tools: dict[str, Tool]) -> None:
    assert await call(tools, "read_file", path="src/pkg/../main.py") == "import os\nprint('Hello World')\n"


async def test_symlinked_file_outside_is_refused(tmp_path: Path, root: Path, tools: dict[str, Tool]) -> None:
    (root / "leak.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    msg = await refused(tools, "read_file", path="leak.txt")
    assert "'leak.txt' is outside the workspace" in msg
    assert "leak.txt" not in await call(tools, "list_files")
    assert "secret" not in await call(tools, "search_files", pattern="hello")
    assert "outside the workspace" in await refused(tools, "search_files", pattern="hello", path="leak.txt")


async def test_symlinked_dir_outside_is_skipped_and_refused(
    tmp_path: Path, root: Path, tools: dict[str, Tool]
) -> None:
    (root / "src" / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    listing = await call(tools, "list_files", recursive=True)
    assert "ext" not in listing and "secret" not in listing
    assert "ext" not in await call(tools, "list_files", path="src")
    assert await call(tools, "search_files", pattern="secret") == "No matches for 'secret' under '.'."
    for name, extra in ALL_PATH_CALLS:
        assert "outside the workspace" in await refused(tools, name, path="src/ext", **extra)
    assert "outside the workspace" in await refused(tools, "read_file", path="src/ext/secret.txt")


async def test_symlinks_inside_are_usable_but_not_followed_when_walking(
    root: Path, tools: dict[str, Tool]
) -> None:
    (root / "alias.py").symlink_to(root / "src" / "main.py")
    (root / "loop").symlink_to(root, target_is_directory=True)  # would recurse forever if followed
    listing = (await call(tools, "list_files", recursive=True)).splitlines()
    assert "alias.py" in listing and "loop/" in listing
    assert not any(line.startswith("loop/") and line != "loop/" for line in listing)
    assert await call(tools, "read_file", path="alias.py") == "import os\nprint('Hello World')\n"
    # Named explicitly, an inside link is resolved and shown by its real place.
    assert (await call(tools, "list_files", path="loop/src")).splitlines() == ["src/main.py", "src/pkg/"]
    out = await call(tools, "search_files", pattern="hello world")
    assert out.splitlines()[1:] == ["alias.py:2: print('Hello World')", "src/main.py:2: print('Hello World')"]


async def test_broken_and_looping_symlinks_do_not_crash(root: Path, tools: dict[str, Tool]) -> None:
    (root / "dangling").symlink_to(root / "no-such-file")
    (root / "self").symlink_to(root / "self")
    await call(tools, "list_files", recursive=True)
    await call(tools, "search_files", pattern="hello")
    assert "no file or directory 'dangling'" in await refused(tools, "read_file", path="dangling")
    await refused(tools, "read_file", path="self")


async def test_symlinked_root_works(tmp_path: Path, root: Path) -> None:
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    tools = {t.name: t for t in workspace_tools(tmp_path / "root-link")}
    assert await call(tools, "read_file", path="README.md") == "# Demo\nSay hello.\n"
    assert "outside the workspace" in await refused(tools, "read_file", path="../outside/secret.txt")


async def test_option_like_names_are_just_names(root: Path, tools: dict[str, Tool]) -> None:
    (root / "-rf").write_text("dash\n")
    assert await call(tools, "read_file", path="-rf") == "dash\n"
    assert (await call(tools, "search_files", pattern="dash", path="-rf")).splitlines()[1:] == ["-rf:1: dash"]


async def test_relative_links_may_climb_within_the_root_only(root: Path, tools: dict[str, Tool]) -> None:
    (root / "src" / "up").symlink_to("../README.md")
    assert await call(tools, "read_file", path="src/up") == "# Demo\nSay hello.\n"
    (root / "src" / "pkg" / "out").symlink_to("../../../outside/secret.txt")
    assert "'src/pkg/out' is outside the workspace" in await refused(tools, "read_file", path="src/pkg/out")
    (root / "src" / "pkg" / "abs").symlink_to("/etc/passwd")
    assert "outside the workspace" in await refused(tools, "read_file", path="src/pkg/abs")
    assert "abs" not in await call(tools, "list_files", path="src/pkg")


async def test_absolute_links_through_the_configured_root_path_work(tmp_path: Path, root: Path) -> None:
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    (root / "abs").symlink_to(tmp_path / "root-link" / "README.md")
    tools = {t.name: t for t in workspace_tools(tmp_path / "root-link")}
    assert await call(tools, "read_file", path="abs") == "# Demo\nSay hello.\n"


async def test_symlink_chains_resolve_up_to_a_hop_limit(root: Path, tools: dict[str, Tool]) -> None:
    previous = "README.md"
    for i in range(45):
        (root / f"hop{i}").symlink_to(previous)
        previous = f"hop{i}"
    assert await call(tools, "read_file", path="hop29") == "# Demo\nSay hello.\n"  # 30 hops
    assert "symlink loop" in await refused(tools, "read_file", path="hop44")  # 45 hops


async def test_overlong_and_nul_paths_are_refused_with_the_path_elided(tools: dict[str, Tool]) -> None:
    msg = await refused(tools, "read_file", path="a/" * 5000)
    assert "too long" in msg and len(msg) < 400
    msg = await refused(tools, "read_file", path="README.md\0" + "x" * 5000)
    assert "'README.md\\x00" in msg and "NUL character" in msg and len(msg) < 400


# --- hardening: non-regular files, depth, offsets, threads (issue 14) ----------------------------------


def test_every_tool_says_it_is_read_only(root: Path) -> None:
    assert all(tool.read_only is True for tool in workspace_tools(root))  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_walks_pass_a_fifo_by_and_searching_one_is_refused(root: Path, tools: dict[str, Tool]) -> None:
    os.mkfifo(root / "pipe")
    assert "pipe" in (await call(tools, "list_files")).splitlines()
    assert "README.md:2: Say hello." in await call(tools, "search_files", pattern="hello")
    assert "not a regular file" in await refused(tools, "search_files", pattern="x", path="pipe")
    assert "not a directory" in await refused(tools, "list_files", path="pipe")


async def test_directories_nested_too_deep_are_skipped_with_a_note(
    root: Path, tools: dict[str, Tool]
) -> None:
    depth = files.MAX_DEPTH
    limit_dir = root.joinpath(*["d"] * depth)
    below = root.joinpath(*["d"] * (depth + 3))
    below.mkdir(parents=True)
    (limit_dir / "last.txt").write_text("hello at the limit\n")
    (below / "below.txt").write_text("hello below the limit\n")
    note = f"[Skipped 1 directory nested deeper than {depth} levels.]"
    last = "d/" * depth + "last.txt"

    out = await call(tools, "search_files", pattern="hello at")
    assert out.splitlines()[1:] == [f"{last}:1: hello at the limit", note]
    assert (
        await call(tools, "search_files", pattern="below the")
        == f"No matches for 'below the' under '.'.\n{note}"
    )
    listing = (await call(tools, "list_files", recursive=True, max_entries=1000)).splitlines()
    assert last in listing and listing[-1] == note and not any("below" in line for line in listing)
    assert await call(tools, "read_file", path=last) == "hello at the limit\n"
    msg = await refused(tools, "read_file", path=str(below.relative_to(root) / "below.txt"))
    assert f"nested deeper than {depth} directories" in msg


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts fds through /proc")
async def test_walks_keep_few_fds_open_however_deep(
    root: Path, tools: dict[str, Tool], monkeypatch: pytest.MonkeyPatch
) -> None:
    root.joinpath(*["d"] * (files.MAX_DEPTH - 1)).mkdir(parents=True)
    baseline = len(os.listdir("/proc/self/fd"))
    peak = 0
    real_scandir = os.scandir

    def counting(*args: Any) -> Any:
        nonlocal peak
        peak = max(peak, len(os.listdir("/proc/self/fd")))
        return real_scandir(*args)

    monkeypatch.setattr(os, "scandir", counting)
    assert await call(tools, "search_files", pattern="nothing") == "No matches for 'nothing' under '.'."
    assert 0 < peak <= baseline + 4  # the root, the directory being read, maybe a file: not one per level


async def test_offset_far_past_the_end_of_a_big_file_is_refused_at_once(
    root: Path, tools: dict[str, Tool]
) -> None:
    with open(root / "big.txt", "wb") as f:
        f.write(b"line\n" * 10_000)  # more than the binary sniff reads
        f.truncate(10 * 2**30)  # sparse: 10 GiB on disk in a few blocks
    msg = await refused(tools, "read_file", path="big.txt", offset=10**12)
    assert (
        msg
        == "'big.txt' has fewer than 1000000000000 lines (it is 10.0 GiB); offset 1000000000000 is past its end."
    )


async def test_offset_skipping_counts_lines_across_chunks(root: Path, tools: dict[str, Tool]) -> None:
    (root / "many.txt").write_text("".join(f"{i:07d}\n" for i in range(1, 400_001)))  # 8 bytes a line
    for offset in (131_072, 131_073, 262_145, 399_999, 400_000):
        out = await call(tools, "read_file", path="many.txt", offset=offset, limit=1)
        assert out.split("\n", 1)[0] == f"{offset:07d}"
    assert "only 400000 line(s)" in await refused(tools, "read_file", path="many.txt", offset=400_001)
    (root / "wide.txt").write_text("a" * (3 * 2**20) + "\nsecond\n")
    assert await call(tools, "read_file", path="wide.txt", offset=2) == "second\n"


async def test_stuck_file_calls_leave_the_default_thread_limiter_free(
    root: Path, tools: dict[str, Tool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As many stuck calls as the default limiter has threads; the server's own to_thread work still runs."""
    stuck_calls = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    gate, entered = threading.Event(), anyio.Event()
    real_scandir = os.scandir

    def stuck(*args: Any) -> Any:
        anyio.from_thread.run_sync(entered.set)
        gate.wait()
        return real_scandir(*args)

    monkeypatch.setattr(os, "scandir", stuck)
    answers: list[str] = []

    async def list_root() -> None:
        answers.append(await call(tools, "list_files"))

    async with anyio.create_task_group() as tg:
        for _ in range(stuck_calls):
            tg.start_soon(list_root)
        try:
            await entered.wait()
            with anyio.fail_after(10):  # a hang guard: on a shared limiter no thread would ever be free
                assert await anyio.to_thread.run_sync(lambda: "free") == "free"
        finally:
            gate.set()
    assert len(answers) == stuck_calls and all("README.md" in a for a in answers)


@pytest.mark.parametrize(
    ("name", "arguments"), [("list_files", {"recursive": True}), ("search_files", {"pattern": "hello"})]
)
async def test_a_cancelled_walk_returns_at_once_and_its_worker_stops(
    root: Path, tools: dict[str, Tool], monkeypatch: pytest.MonkeyPatch, name: str, arguments: dict[str, Any]
) -> None:
    """Control comes back while the worker is still stuck; released, the worker reads no further directory."""
    for i in range(20):
        (root / f"dir{i}").mkdir()
        (root / f"dir{i}" / "f.txt").write_text("hello\n")
    started, gate, worker_done = anyio.Event(), threading.Event(), threading.Event()
    scanned: list[threading.Thread] = []
    real_scandir = os.scandir

    def stuck_once(*args: Any) -> Any:
        scanned.append(threading.current_thread())
        if len(scanned) == 1:
            anyio.from_thread.run_sync(started.set)
            gate.wait()
        return real_scandir(*args)

    monkeypatch.setattr(os, "scandir", stuck_once)
    tool = tools[name]
    work = tool.run  # type: ignore[attr-defined]

    def observed(*args: Any) -> str:
        try:
            return work(*args)
        finally:
            worker_done.set()

    monkeypatch.setattr(tool, "run", observed)
    hang_guard = threading.Timer(10, gate.set)  # an implementation that waits for its worker gets unstuck
    hang_guard.start()
    finished = False
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_started() -> None:
                    await started.wait()
                    scope.cancel()

                tg.start_soon(cancel_once_started)
                await tool.call(arguments)
                finished = True
        assert scope.cancelled_caught and not finished
        assert not gate.is_set(), "the call waited for its stuck worker instead of returning"
    finally:
        hang_guard.cancel()
        gate.set()
    assert worker_done.wait(10)
    assert len(scanned) == 1 and scanned[0] is not threading.main_thread()


async def test_os_errors_become_sentences(
    root: Path, tools: dict[str, Tool], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def denied(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "README.md":
            raise PermissionError(13, "Permission denied", str(root / "README.md"))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", denied)
    msg = await refused(tools, "read_file", path="README.md")
    assert msg == "read_file could not read 'README.md': Permission denied."
    assert str(root) not in msg
