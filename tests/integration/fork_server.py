"""A warm process that forks one child per CLI run, for the kill -9 tests (agent installs, `learn`).

The child runs ``edgekiln ARGV`` (the CLI's ``main``) as a separate process, so a crash hook can
SIGKILL it; forking after the imports (no thread is started before the fork) makes each run cost
~0.1 s instead of a cold interpreter start. Requests are JSON lines on stdin
(``{"argv", "env", "log"}``: the child's stdout and stderr go to ``log``); each answer is a JSON line
``{"returncode"}`` (``-9`` for a SIGKILL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_LOOP = r"""
import json, os, signal, sys, traceback
from edgekiln.cli.app import main
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        signal.alarm(60)   # a hung run dies (SIGALRM) instead of blocking the tests
        try:
            os.environ.update(req["env"])
            out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            main(req["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)   # never fall back into the parent's loop
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"returncode": rc}), flush=True)
"""


def fork_server_script(warm_imports: str) -> str:
    """The server's ``python -c`` source: ``warm_imports`` (modules every child needs, imported once;
    none may start a thread), then the fork loop."""
    return warm_imports.rstrip("\n") + "\n" + _LOOP


class ForkServer:
    """The fork server as a context manager: ``run(argv, env, log)`` runs ``edgekiln ARGV`` in a fresh
    child and returns its exit code (``-9`` when it was SIGKILLed)."""

    def __init__(self, warm_imports: str) -> None:
        self.script = fork_server_script(warm_imports)
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ForkServer:
        self.proc = subprocess.Popen([sys.executable, "-c", self.script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self

    def run(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["returncode"])

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
