"""Settings: each flag and variable of product.md, with its default; the HTTP guards built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import parser
from server.http import UnsafeBind, check_bind, transport_security
from server.settings import resolve


def settings_for(argv: list[str], env: dict[str, str]):
    return resolve(parser().parse_args(argv), env)


def test_defaults_follow_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings_for([], {"XDG_DATA_HOME": "/xdg"})
    assert s.data_dir == Path("/xdg/agent-trace-mcp")
    assert s.db == s.data_dir / "traces.db" and s.experiences == s.data_dir / "experiences.md"
    assert s.skills_dir == s.data_dir / "skills" and s.workspace == tmp_path
    assert s.model == "openai:gpt-4o" and s.mcp_config is None
    assert (s.transport, s.host, s.port) == ("stdio", "127.0.0.1", 8765)
    assert s.experience_recall == 5 and s.auth_token is None
    assert (s.max_wait, s.idle_exit, s.in_process, s.context_tokens) == (45, 600, False, None)
    assert s.tool_timeout == 120
    assert settings_for([], {"HOME": "/home/u"}).data_dir == Path("/home/u/.local/share/agent-trace-mcp")


def test_every_variable_is_read_and_flags_win():
    env = {
        "AGENT_TRACE_HOME": "/d",
        "AGENT_TRACE_DB": "/x/t.db",
        "AGENT_TRACE_EXPERIENCES": "/x/e.md",
        "AGENT_TRACE_MODEL": "offline",
        "AGENT_TRACE_MCP_CONFIG": "/x/m.json",
        "AGENT_TRACE_SKILLS": "/x/skills",
        "AGENT_TRACE_WORKSPACE": "/w",
        "AGENT_TRACE_EXPERIENCE_RECALL": "0",
        "AGENT_TRACE_EXPERIENCE_BUDGET": "7",
        "AGENT_TRACE_TOKEN": "tok",
        "AGENT_TRACE_MAX_WAIT": "5",
        "AGENT_TRACE_IDLE_EXIT": "30",
        "AGENT_TRACE_IN_PROCESS": "1",
        "AGENT_TRACE_CONTEXT_TOKENS": "32000",
    }
    s = settings_for([], env)
    assert (s.data_dir, s.db, s.experiences) == (Path("/d"), Path("/x/t.db"), Path("/x/e.md"))
    assert (s.model, s.mcp_config, s.skills_dir, s.workspace) == (
        "offline",
        Path("/x/m.json"),
        Path("/x/skills"),
        Path("/w"),
    )
    assert (s.experience_recall, s.experience_budget, s.auth_token) == (0, 7, "tok")
    assert (s.max_wait, s.idle_exit, s.in_process, s.context_tokens) == (5, 30, True, 32000)
    flags = ["--max-wait", "10", "--idle-exit", "60", "--context-tokens", "64000", "--tool-timeout", "9"]
    s = settings_for(flags, env)
    assert (s.max_wait, s.idle_exit, s.context_tokens, s.tool_timeout) == (10, 60, 64000, 9)
    assert settings_for(["--no-in-process"], env).in_process is False  # a flag wins either way
    s = settings_for(["--model", "anthropic:claude", "--data-dir", "/f", "--experience-recall", "3"], env)
    assert (s.model, s.data_dir, s.experience_recall) == ("anthropic:claude", Path("/f"), 3)
    assert s.db == Path("/x/t.db")  # the variable still names the db
    bare = [settings_for(["--model", name], {}).model for name in ("claude-sonnet-4-5", "gpt-4o", "offline")]
    assert bare == ["anthropic:claude-sonnet-4-5", "openai:gpt-4o", "offline"]  # as traces store it


def test_a_bad_number_in_a_variable_is_a_sentence():
    with pytest.raises(SystemExit, match="AGENT_TRACE_EXPERIENCE_RECALL='many' is not a valid int"):
        settings_for([], {"AGENT_TRACE_EXPERIENCE_RECALL": "many"})


def test_open_bind_needs_a_token_or_allowed_hosts():
    with pytest.raises(UnsafeBind, match="0.0.0.0"):
        check_bind(settings_for(["--host", "0.0.0.0"], {}))
    check_bind(settings_for(["--host", "0.0.0.0", "--auth-token", "t"], {}))
    check_bind(settings_for(["--host", "0.0.0.0", "--allowed-host", "mcp.example.com"], {}))
    check_bind(settings_for([], {}))


def test_allowed_hosts_keep_rebinding_protection_on():
    loopback = transport_security(settings_for([], {}))
    assert loopback.enable_dns_rebinding_protection and "localhost" in loopback.allowed_hosts  # port 80 too
    assert "evil.example:*" not in loopback.allowed_hosts
    security = transport_security(settings_for(["--allowed-host", "MCP.Example.com"], {}))
    assert {"MCP.Example.com", "mcp.example.com"} <= set(security.allowed_hosts)  # as typed, as clients send
    assert security.enable_dns_rebinding_protection
    assert "mcp.example.com" in security.allowed_hosts and "mcp.example.com:*" in security.allowed_hosts
    assert "https://mcp.example.com" in security.allowed_origins
    assert "http://evil.example" not in security.allowed_origins


def test_a_value_out_of_range_is_named_as_it_was_given():
    with pytest.raises(
        SystemExit, match=r"^agent-trace-mcp: AGENT_TRACE_LEASE_SECONDS must be at least 15; got 3\.$"
    ):
        settings_for([], {"AGENT_TRACE_LEASE_SECONDS": "3"})
    with pytest.raises(SystemExit, match=r"^agent-trace-mcp: --lease-seconds must be at least 15; got 3\.$"):
        settings_for(["--lease-seconds", "3"], {"AGENT_TRACE_LEASE_SECONDS": "30"})
    for argv in (["--tool-timeout", "0"], ["--idle-exit", "-1"], ["--experience-budget", "0"]):
        with pytest.raises(SystemExit, match=f"{argv[0]} must be at least"):
            settings_for(argv, {})
    with pytest.raises(SystemExit, match=r"--port must be 0 to 65535; got 99999\."):
        settings_for(["--port", "99999"], {})


def test_a_db_that_is_neither_a_file_nor_a_postgresql_url_is_refused_not_made_a_folder(tmp_path):
    """A mistyped URL used to become a relative SQLite path: replicas then each kept a private store."""
    for wrong in ("mysql://root:secret@127.0.0.1/x", "postgresql:/postgres@h/x", "postgresql+asyncpg://h/x"):
        with pytest.raises(
            SystemExit, match=r"^agent-trace-mcp: --db must be a SQLite file path or a postgresql"
        ) as refused:
            settings_for(["--db", wrong], {})
        assert "secret" not in str(refused.value)
    with pytest.raises(SystemExit, match=r"^agent-trace-mcp: AGENT_TRACE_DB must be"):
        settings_for([], {"AGENT_TRACE_DB": "http://127.0.0.1:5432/x"})
    for broken in ("postgresql://postgres@[::1:5432/x", "postgresql://u:se/cret@h/db"):
        with pytest.raises(SystemExit, match=r"--db is not a valid PostgreSQL URL \(its host or port") as bad:
            settings_for(["--db", broken], {})
        assert "se" not in str(bad.value).split("(")[1]  # nothing of the password
    several = "postgresql://u:p@h1:5432,h2:5433/db"  # multi-host, as libpq and asyncpg take it
    assert settings_for(["--db", several], {}).db == several
    assert settings_for(["--db", str(tmp_path / "t.db")], {}).db == tmp_path / "t.db"
    assert settings_for(["--db", "postgres://u@h/d"], {}).db == "postgres://u@h/d"


def test_a_flag_of_the_wrong_type_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["--max-wait", "abc"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "agent-trace-mcp: argument --max-wait: invalid float value: 'abc' "
        "(agent-trace-mcp --help lists the options).\n"
    )


def test_a_log_line_is_cut_however_long_what_a_client_sent():
    import logging

    from server.cli import LOG_RECORD_CHARS, ClippedFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "Resource %s", ("U" * 1_000_000,), None)
    line = ClippedFormatter("%(message)s").format(record)
    assert len(line) < LOG_RECORD_CHARS + 100 and line.endswith("[log line cut: 1,000,009 characters]")
    try:
        raise ValueError("the end of the traceback")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "%s", ("V" * 100_000,), sys.exc_info())
    assert ClippedFormatter("%(message)s").format(failed).endswith("ValueError: the end of the traceback")


def test_a_data_dir_reached_through_a_symlink_has_the_same_settings_and_idle_exit_counts(tmp_path):
    """Hosts compare their settings with the shared server's: the same folder spelled through a symlink is
    no difference; another --idle-exit is one (the later host is told it does not apply)."""
    from server.relay import differing, settings_digests

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    one = settings_for(["--data-dir", str(real), "--workspace", str(real)], {})
    other = settings_for(["--data-dir", str(tmp_path / "link"), "--workspace", str(tmp_path / "link")], {})
    assert differing(settings_digests(one, {}), settings_digests(other, {})) == []
    shorter = settings_for(["--data-dir", str(real), "--workspace", str(real), "--idle-exit", "2"], {})
    assert differing(settings_digests(one, {}), settings_digests(shorter, {})) == ["--idle-exit"]
