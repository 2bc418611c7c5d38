"""`edgekiln agent`: the device side of over-the-air updates (see docs/fleet-protocol.md).

    edgekiln agent --server URL --token T --state DIR --root root.json --once
    edgekiln agent --server https://fleet:8443 --ca ca.pem --token T --state DIR --root root.json --once
    edgekiln agent --server URL --token T --state DIR --interval 60
    edgekiln agent --server https://fleet:8443 --ca ca.pem --token T --state DIR --push mqtt --mqtt mqtts://fleet:8883
    edgekiln agent --state DIR --status --json

Exit codes of ``--once``: 0 the device is up to date (or just installed the update); 1 the
update was refused, failed verification or was rolled back (the previous model stays active);
2 bad input (no root, bad token, ...); 4 the server could not be reached or the download was
cut (it resumes on the next run).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.errors import EdgekilnError

EXIT_FAILED = 1
EXIT_UNREACHABLE = 4


def register(app: typer.Typer) -> None:
    app.command("agent")(agent_command)


def agent_command(
    state: Path = typer.Option(..., "--state", help="The device's state folder (A/B slots, downloads, TUF metadata)."),
    server: str = typer.Option(None, "--server", help="Update server URL, e.g. https://10.0.0.2:8443 (plain "
                               "http:// only to this machine, unless --insecure-http)."),
    token: str = typer.Option(None, "--token", envvar="EDGEKILN_DEVICE_TOKEN",
                              help="Device token from `edgekiln devices add` (or EDGEKILN_DEVICE_TOKEN)."),
    root: Path = typer.Option(None, "--root", help="Trusted TUF root.json (enrolment: the server's KEYS/root.json). "
                              "Needed on the first run; later runs use the root stored in the state folder."),
    director_root: Path = typer.Option(None, "--director-root", help="Trusted director root (the server's "
                                       "KEYS/director-root.json); default: director-root.json next to --root."),
    ca: Path = typer.Option(None, "--ca", envvar="EDGEKILN_CA", help="CA certificate (PEM) the server's TLS "
                            "certificate must chain to (or EDGEKILN_CA); default: the system's trust store."),
    insecure_http: bool = typer.Option(False, "--insecure-http", help="Allow plain http:// to a server that is not "
                                       "this machine: the device token travels in clear."),
    once: bool = typer.Option(False, "--once", help="One check-and-update cycle, then exit."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between checks when running as a daemon."),
    status: bool = typer.Option(False, "--status", help="Print the agent's state (active version, pending update) "
                                "and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --status: print JSON."),
    chunk_size: int = typer.Option(1 << 16, "--chunk-size", help="Download chunk size in bytes."),
    push: str = typer.Option("auto", "--push", help="How the server tells the daemon to check at once: auto (MQTT "
                             "if the server advertises a broker on its own host, else its WebSocket), mqtt, "
                             "websocket, or off (poll only). Polling stays the fallback."),
    mqtt: str = typer.Option(None, "--mqtt", help="MQTT broker URL (mqtts://HOST:PORT; overrides the advertised one; "
                             "plain mqtt:// only to this machine unless --insecure-http)."),
    push_poll: float = typer.Option(None, "--push-poll-interval", help="Seconds between safety checks while a push "
                                    "channel is connected (default: the server's setting, 900)."),
    no_delta: bool = typer.Option(False, "--no-delta", help="Always download full bundles (patching a delta needs "
                                  "the base, the delta and the result in memory and on disk)."),
) -> None:
    """Keep this device's model up to date: verified download, A/B install, health check, rollback."""
    if status:
        _print_status(state, as_json)
        return
    if not server or not token:
        raise EdgekilnError("agent: --server and --token are required (unless --status)")
    if interval <= 0:
        raise EdgekilnError(f"agent: --interval must be > 0 seconds, got {interval}")
    if push_poll is not None and push_poll <= 0:
        raise EdgekilnError(f"agent: --push-poll-interval must be > 0 seconds, got {push_poll}")
    from edgekiln.fleet.agent_loop import PUSH_MODES
    from edgekiln.fleet.push import check_mqtt_url

    if push not in PUSH_MODES:
        raise EdgekilnError(f"agent: --push must be one of {', '.join(PUSH_MODES)}, got {push!r}")
    if mqtt is not None:
        check_mqtt_url(mqtt, insecure_http=insecure_http)
    from edgekiln.fleet.agent import Agent, AgentConfig
    from edgekiln.fleet.agent_crash import checkpoint_from_env
    from edgekiln.fleet.fetcher import ServerUnreachable

    if ca is not None and not ca.is_file():
        raise EdgekilnError(f"agent: --ca {ca}: file not found")
    config = AgentConfig(server=server, token=token, state_dir=state, root=root, director_root=director_root,
                         ca=ca, insecure_http=insecure_http, chunk_size=chunk_size, delta=not no_delta)
    agent = Agent(config, checkpoint=checkpoint_from_env(), log=lambda line: typer.echo(line, err=True))
    try:
        if not once:
            from edgekiln.fleet.agent_loop import serve

            typer.echo(f"agent: checking {server} every {interval:g} s, push {push} (state {state})", err=True)
            serve(agent, interval_s=interval, push=push, mqtt_url=mqtt, push_poll_s=push_poll)
            return
        try:
            result = agent.run_once()
        except ServerUnreachable as exc:
            typer.echo(f"error: {exc}; the active model is unchanged", err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None
    finally:
        agent.close()
    line = f"{result['outcome']}: {result.get('model') or '-'} v{result.get('version') or '-'}"
    typer.echo(line + (f" ({result['error']})" if result.get("error") else ""))
    if result["outcome"] == "retry":
        raise typer.Exit(EXIT_UNREACHABLE)
    if result["outcome"] not in ("idle", "up-to-date", "installed"):
        raise typer.Exit(EXIT_FAILED)


def _print_status(state: Path, as_json: bool) -> None:
    from edgekiln.fleet.agent import status

    data = status(state)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    pending = data.get("pending") or {}
    typer.echo(f"model {data.get('model') or '-'}  active v{data.get('active_version') or '-'} "
               f"(slot {data.get('active_slot') or '-'})")
    if pending:
        typer.echo(f"pending: v{pending.get('version')} ({pending.get('stage')})")
    if data.get("last_error"):
        typer.echo(f"last error: {data['last_error']}")
    if data.get("reports_queued"):
        typer.echo(f"{data['reports_queued']} report(s) queued for the server")
