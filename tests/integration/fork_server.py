"""A warm process that forks one child per CLI run, for the kill -9 tests (agent installs, `learn`).

The child runs ``edgekiln ARGV`` (the CLI's ``main``) as a separate process, so a crash hook can
SIGKILL it; forking after the imports (no thread is started before the fork) makes each run cost
~0.1 s instead of a cold interpreter start. Requests are JSON lines on stdin
(``{"argv", "env", "log"}``: the child's stdout and stderr go to ``log``); each answer is a JSON line
``{"returncode"}`` (``-9`` for a SIGKILL).
"""

from __future__ import annotations

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
