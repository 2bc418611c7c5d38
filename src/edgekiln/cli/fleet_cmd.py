"""Operator commands of the update server: `serve`, `publish`, `rollout ...`, `devices ...`.

The client commands take ``--server`` (or ``EDGEKILN_SERVER``), ``--token`` (or
``EDGEKILN_ADMIN_TOKEN``) and ``--ca`` (or ``EDGEKILN_CA``: the CA that signed the server's TLS
certificate); plain ``http://`` is refused unless the server is on this machine or
``--insecure-http`` is given. An unreachable or untrusted server or a refused token is a one-line
error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from edgekiln.errors import EdgekilnError

SERVER = typer.Option("http://127.0.0.1:8080", "--server", envvar="EDGEKILN_SERVER", help="Update server URL.")
TOKEN = typer.Option(..., "--token", envvar="EDGEKILN_ADMIN_TOKEN", help="Admin token.", show_default=False)
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
CA = typer.Option(None, "--ca", envvar="EDGEKILN_CA",
                  help="CA certificate (PEM) the server's TLS certificate is signed by (default: the system's).")
INSECURE = typer.Option(False, "--insecure-http",
                        help="Allow plain http:// to a host other than this machine (the token travels in clear).")

rollout_app = typer.Typer(help="Staged rollouts: start, pause, resume, status.", no_args_is_help=True)
devices_app = typer.Typer(help="Register and list devices; set the channel a group follows.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("publish")(publish_command)
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(devices_app, name="devices")


def serve_command(
    db: str = typer.Option("sqlite:///edgekiln-fleet/fleet.db", "--db", help="sqlite:///FILE or postgresql://..."),
    store: str = typer.Option("edgekiln-fleet/blobs", "--store", help="Bundle store: a folder or s3://bucket/prefix."),
    keys: Path = typer.Option(Path("edgekiln-fleet/keys"), "--keys", help="TUF key folder (created on first start)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    admin_token_file: Path = typer.Option(None, "--admin-token-file",
                                          help="File holding the admin token (else EDGEKILN_ADMIN_TOKEN)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="Endpoint of an S3-compatible store (MinIO, ...)."),
    max_bundle_mb: int = typer.Option(512, "--max-bundle-mb", help="Largest bundle upload accepted."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every request."),
    expiry: str = typer.Option(None, "--expiry", help="Metadata validity in days per role, e.g. "
                               "timestamp=1,snapshot=7,targets=30,root=365 (these are the defaults)."),
    keep_alive: int = typer.Option(75, "--keep-alive", help="Seconds an idle connection is kept open; keep it "
                                   "above the agents' poll interval, or polls race the server closing it."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="TLS certificate chain (PEM); serve https."),
    tls_key: Path = typer.Option(None, "--tls-key", help="TLS private key (PEM, mode 0600)."),
    insecure_http: bool = typer.Option(False, "--insecure-http",
                                       help="Allow plain http on a --host other than loopback (tokens in clear)."),
    spool: Path = typer.Option(None, "--spool", help="Folder for uploads in flight (default: next to --keys)."),
) -> None:
    """Run the update server (registry, signed TUF metadata, staged rollouts)."""
    import uvicorn

    from edgekiln.fleet.auth import check_admin_token
    from edgekiln.fleet.keys import require_initialized, serve_warnings
    from edgekiln.fleet.server import ServerConfig, create_app
    from edgekiln.runtime.transport_security import is_loopback_host, server_tls_kwargs

    tls = server_tls_kwargs(tls_cert, tls_key)
    if not tls and not is_loopback_host(host) and not insecure_http:
        raise EdgekilnError(f"refusing to serve plain http on {host}: tokens would travel in clear; give "
                            "--tls-cert FILE --tls-key FILE, or pass --insecure-http")
    if admin_token_file is not None:
        if not admin_token_file.is_file():
            raise EdgekilnError(f"{admin_token_file}: admin token file not found")
        token = admin_token_file.read_text().strip()
    else:
        token = os.environ.get("EDGEKILN_ADMIN_TOKEN", "").strip()
    if not token:
        raise EdgekilnError("no admin token: set EDGEKILN_ADMIN_TOKEN or pass --admin-token-file FILE")
    check_admin_token(token)
    require_initialized(keys)
    for line in serve_warnings(keys):
        typer.echo(line, err=True)
    config = ServerConfig(db_url=db, store_url=store, keys_dir=str(keys), admin_token=token, s3_endpoint=s3_endpoint,
                          max_bundle_bytes=max_bundle_mb * 1024 * 1024, expiry=parse_expiry(expiry),
                          spool_dir=str(spool if spool is not None else keys.parent / "spool"))
    app = create_app(config)
    scheme = "https" if tls else "http"
    typer.echo(f"edgekiln update server on {scheme}://{host}:{port} (db {_redact(db)}, store {store}, keys {keys}; "
               f"enrol devices with {keys / 'root.json'})")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log, timeout_keep_alive=keep_alive,
                **tls)


def parse_expiry(text: str | None) -> Any:
    """``"timestamp=0.5,targets=10"`` -> a TufExpiry with those roles changed."""
    from edgekiln.fleet.tuf_repo import TufExpiry

    if not text:
        return TufExpiry()
    days: dict[str, float] = {}
    for part in text.split(","):
        role, _, value = part.partition("=")
        role = role.strip()
        if role not in ("timestamp", "snapshot", "targets", "root"):
            raise EdgekilnError(f"--expiry: unknown role '{role}' (use timestamp, snapshot, targets, root)")
        try:
            days[f"{role}_days"] = float(value)
        except ValueError:
            raise EdgekilnError(f"--expiry: '{part}' is not ROLE=DAYS") from None
        if not days[f"{role}_days"] > 0:
            raise EdgekilnError(f"--expiry: {role} validity must be positive")
    return TufExpiry(**days)


def _redact(url: str) -> str:
    from edgekiln.fleet.db import redact_url

    return redact_url(url)


def publish_command(
    bundle: Path = typer.Argument(..., help="Bundle folder (or its .tar)."),
    server: str = SERVER,
    token: str = TOKEN,
    ca: str = CA,
    insecure_http: bool = INSECURE,
    channel: str = typer.Option("stable", "--channel"),
    model: str = typer.Option(None, "--model", help="Model name (default: the manifest's name)."),
    version: int = typer.Option(None, "--version", help="Integer version (default: the manifest's version)."),
) -> None:
    """Publish a bundle as an immutable version on a channel."""
    from edgekiln.fleet.client import publish

    out = publish(bundle, server, token, channel, model=model, version=version, tls=_tls(ca, insecure_http))
    typer.echo(f"published {out['model']} v{out['version']} on {out['channel']}: {out['target_path']} "
               f"({out['length']} bytes, sha256 {out['sha256'][:16]}...)")


@rollout_app.command("start")
def rollout_start_command(
    model: str = typer.Argument(...),
    version: int = typer.Argument(...),
    group: str = typer.Option(..., "--group"),
    percent: float = typer.Option(None, "--percent", help="A single wave of this percentage of the group."),
    waves: str = typer.Option(None, "--waves", help="Cumulative wave percentages, e.g. 10,50,100."),
    success_threshold: float = typer.Option(1.0, "--success-threshold", help="Installed share to start the next wave."),
    failure_threshold: float = typer.Option(0.2, "--failure-threshold", help="Failed share that halts the rollout."),
    server: str = SERVER, token: str = TOKEN, as_json: bool = AS_JSON, ca: str = CA,
    insecure_http: bool = INSECURE,
) -> None:
    """Start rolling MODEL VERSION out to a device group."""
    from edgekiln.fleet.client import rollout_start

    if percent is not None and waves is not None:
        raise EdgekilnError("give --percent or --waves, not both")
    wave_list = [percent] if percent is not None else _waves(waves) if waves else [100.0]
    _show_rollout(rollout_start(server, token, model, version, group, waves=wave_list,
                                success_threshold=success_threshold, failure_threshold=failure_threshold,
                                tls=_tls(ca, insecure_http)), as_json)


def _waves(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise EdgekilnError(f"--waves {text!r}: expected comma-separated percentages such as 10,50,100") from None


@rollout_app.command("pause")
def rollout_pause_command(rollout_id: int = typer.Argument(...), server: str = SERVER, token: str = TOKEN,
                          as_json: bool = AS_JSON,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Pause a running rollout (no new devices, no new wave)."""
    from edgekiln.fleet.client import rollout_pause

    _show_rollout(rollout_pause(server, token, rollout_id, tls=_tls(ca, insecure_http)), as_json)


@rollout_app.command("resume")
def rollout_resume_command(rollout_id: int = typer.Argument(...), server: str = SERVER, token: str = TOKEN,
                           as_json: bool = AS_JSON,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Resume a paused rollout."""
    from edgekiln.fleet.client import rollout_resume

    _show_rollout(rollout_resume(server, token, rollout_id, tls=_tls(ca, insecure_http)), as_json)


@rollout_app.command("status")
def rollout_status_command(rollout_id: int = typer.Argument(None, help="Rollout id (all rollouts if omitted)."),
                           server: str = SERVER, token: str = TOKEN, as_json: bool = AS_JSON,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Show one rollout with its devices, or list all rollouts."""
    from edgekiln.fleet.client import rollout_status

    out = rollout_status(server, token, rollout_id, tls=_tls(ca, insecure_http))
    if isinstance(out, list):
        if as_json:
            typer.echo(json.dumps(out, indent=2))
            return
        _table("rollouts", ["id", "model", "version", "group", "state", "wave", "waves"],
               [[r["id"], r["model"], r["version"], r["group"], r["state"], r["wave"] + 1, r["waves"]] for r in out])
        return
    _show_rollout(out, as_json)


def _show_rollout(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    reason = f" ({r['reason']})" if r.get("reason") else ""
    typer.echo(f"rollout {r['id']}: {r['model']} v{r['version']} -> group {r['group']}, {r['state']}{reason}, "
               f"wave {r['wave'] + 1}/{len(r['waves'])} of {r['waves']}")
    _table("devices", ["device", "selected", "wave", "status", "active version", "error"],
           [[d["name"], "yes" if d["selected"] else "", "" if d["wave"] is None else d["wave"] + 1,
             d["status"] or "", d["version"] if d["version"] is not None else "", (d["error"] or "")[:60]]
            for d in r["devices"]])


@devices_app.command("add")
def devices_add_command(name: str = typer.Argument(...), group: str = typer.Option(..., "--group"),
                        server: str = SERVER, token: str = TOKEN, as_json: bool = AS_JSON,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Register a device; prints its token (shown only this once)."""
    from edgekiln.fleet.client import add_device

    out = add_device(server, token, name, group, tls=_tls(ca, insecure_http))
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"device {out['name']} added to group {out['group']}; its token (shown only once):")
    typer.echo(out["token"])


@devices_app.command("remove")
def devices_remove_command(name: str = typer.Argument(...), server: str = SERVER, token: str = TOKEN,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Revoke a device (lost or stolen): its token stops working at once."""
    from edgekiln.fleet.client import remove_device

    remove_device(server, token, name, tls=_tls(ca, insecure_http))
    typer.echo(f"device {name} removed; its token no longer works")


@devices_app.command("list")
def devices_list_command(server: str = SERVER, token: str = TOKEN, as_json: bool = AS_JSON,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """List devices with their active version, last contact, last error and latency."""
    from edgekiln.fleet.client import list_devices

    rows = list_devices(server, token, tls=_tls(ca, insecure_http))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return

    _table("devices", ["device", "group", "model", "active version", "status", "last seen (UTC)", "last error",
                       "p50 ms", "p95 ms"],
           [_device_row(d) for d in rows])


@devices_app.command("group")
def devices_group_command(group: str = typer.Argument(...), channel: str = typer.Option(..., "--channel"),
                          server: str = SERVER, token: str = TOKEN,
        ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Set the channel a device group follows (its devices may download that channel's bundles)."""
    from edgekiln.fleet.client import set_group_channel

    out = set_group_channel(server, token, group, channel, tls=_tls(ca, insecure_http))
    typer.echo(f"group {out['name']} follows channel {out['channel']}")


def _device_row(d: dict[str, Any]) -> list[str]:
    """One row of ``devices list``: "" for anything missing or not a finite number (the server's
    answer is not trusted to be well-formed)."""
    import datetime as dt
    import math

    def number(v: Any, fmt: str = ".2f") -> str:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return format(v, fmt) if ok else ""

    def when(t: Any) -> str:
        try:
            return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if number(t) else ""
        except (OverflowError, OSError, ValueError):
            return ""

    latency = d.get("latency_ms") if isinstance(d.get("latency_ms"), dict) else {}
    return [str(d.get("name") or ""), str(d.get("group") or ""), str(d.get("model") or ""),
            str(d.get("active_version") or ""), str(d.get("status") or ""), when(d.get("last_seen")),
            str(d.get("last_error") or "")[:50], number(latency.get("p50")), number(latency.get("p95"))]


def _tls(ca: str | None, insecure_http: bool) -> Any:
    from edgekiln.runtime.transport_security import TlsOptions

    return TlsOptions(ca=ca or None, insecure_http=insecure_http)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console().print(table)
