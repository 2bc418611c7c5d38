"""The ``edgekiln`` command: a thin layer from argv to library calls.

Each command lives in its own module under ``edgekiln.cli`` with a ``register(app)`` function;
:data:`COMMAND_MODULES` lists them explicitly. Command modules import heavy libraries inside
the command function, never at module level, so ``edgekiln --help`` stays fast.

Errors users can cause raise :class:`~edgekiln.errors.EdgekilnError`; :func:`main` prints its
one-line message and exits with its code. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from edgekiln.errors import EdgekilnError

COMMAND_MODULES = (
    "edgekiln.cli.inspect_cmd",
    "edgekiln.cli.targets_cmd",
    "edgekiln.cli.place_cmd",
    "edgekiln.cli.bench_cmd",
    "edgekiln.cli.example_cmd",
    "edgekiln.cli.quantize_cmd",
    "edgekiln.cli.prune_cmd",
    "edgekiln.cli.distill_cmd",
    "edgekiln.cli.search_arch_cmd",
    "edgekiln.cli.optimize_cmd",
    "edgekiln.cli.runtime_cmd",
    "edgekiln.cli.learn_cmd",
    "edgekiln.cli.split_cmd",
    "edgekiln.cli.export_cmd",
    "edgekiln.cli.verify_c_cmd",
    "edgekiln.cli.measure_mcu_cmd",
    "edgekiln.cli.agent_cmd",
    "edgekiln.cli.fleet_cmd",
    "edgekiln.cli.keys_cmd",
    "edgekiln.cli.broker_cmd",
    "edgekiln.cli.federate_cmd",
)

app = typer.Typer(
    name="edgekiln",
    help="Take a trained neural network to edge devices: compress, compile, measure, deploy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    if debug:
        os.environ["EDGEKILN_DEBUG"] = "1"


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _register_all()
    try:
        # NOTE: without standalone mode click *returns* the code of a typer.Exit instead of raising.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except EdgekilnError as exc:
        if debug:
            raise
        _err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = exc.exit_code if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code or 0)
    except typer.Abort:
        _err("aborted")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - usage errors (typer's click) carry their own exit code
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        _err(f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
             "rerun with --debug for the traceback")
        sys.exit(1)


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
