"""Exec a downstream server so the kernel kills it when we die, even by SIGKILL (Linux).

Run as ``python -I -S die_with_parent.py PARENT_PID EXECUTABLE ARGV0 [ARGS...]``, never imported: it
asks for SIGKILL on its parent's death (``prctl(PR_SET_PDEATHSIG)``), checks the parent did not die
already, and execs the server in place (same pid, same pipes). The request survives ``exec`` except
into set-user-ID programs. Standard library only, without ``site``, so it starts in milliseconds.
"""

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, executable, command = int(argv[1]), argv[2], argv[3:]
    with contextlib.suppress(OSError, AttributeError):  # no prctl: it runs, as it would without us
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # our parent died between fork and prctl: nobody would ever kill us
        os._exit(1)
    try:
        os.execv(executable, command)
    except OSError as exc:
        os.write(2, f"cannot run {executable}: {exc.strerror}\n".encode(errors="replace"))
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv)
