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
    keys: Path = typer.Option(Path("edgekiln-fleet/keys"), "--keys", help="TUF key folder, made by `edgekiln keys init KEYS --root-key FILE` (devices enrol with its root.json and director-root.json)."),
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
    mqtt: str = typer.Option(None, "--mqtt", help="MQTT broker for update notices and telemetry, e.g. "
                             "mqtts://127.0.0.1:8883 (the server user's password: EDGEKILN_MQTT_PASSWORD)."),
    mqtt_ca: Path = typer.Option(None, "--mqtt-ca", help="CA of the broker's TLS certificate (default: the system's)."),
    mqtt_advertise: str = typer.Option(None, "--mqtt-advertise", help="Broker URL told to devices (default: --mqtt)."),
    mqtt_broker_dir: Path = typer.Option(None, "--mqtt-broker-dir", help="Folder of `edgekiln broker config`: its "
                                         "passwd/acl are rewritten and the broker reloaded on device add/remove."),
    ws_ping: float = typer.Option(0.0, "--ws-ping", help="Seconds between the server's own WebSocket pings (0: "
                                                          "none; devices ping every 60 s, as MQTT's keepalive, and "
                                                          "one side's pings keep the link and detect a dead one)."),
    push_poll: float = typer.Option(900.0, "--push-poll-interval", help="Safety poll advertised to devices "
                                    "while their push channel is up (seconds)."),
    telemetry_every: float = typer.Option(300.0, "--telemetry-every", help="Telemetry period advertised to "
                                          "devices (seconds)."),
    notice_sweep: float = typer.Option(2.0, "--notice-sweep", help="Seconds within which a change made by another "
                                       "server process reaches this one's notices (raise it for 10^5 devices)."),
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
    mqtt_options = _mqtt_options(mqtt, mqtt_ca, mqtt_advertise, mqtt_broker_dir, insecure_http)
    if not 0 <= ws_ping < 1e7:
        raise EdgekilnError(f"--ws-ping {ws_ping:g}: must be 0 (no server pings) or a positive number of seconds")
    for option, value in (("--push-poll-interval", push_poll),
                          ("--telemetry-every", telemetry_every), ("--notice-sweep", notice_sweep)):
        if not 0 < value < 1e7:
            raise EdgekilnError(f"{option} {value:g}: must be a positive number of seconds")
    mqtt_options.update(push_poll_s=push_poll, telemetry_every_s=telemetry_every, notice_sweep_s=notice_sweep)
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
                          spool_dir=str(spool if spool is not None else keys.parent / "spool"), **mqtt_options)
    app = create_app(config)
    scheme = "https" if tls else "http"
    typer.echo(f"edgekiln update server on {scheme}://{host}:{port} (db {_redact(db)}, store {store}, keys {keys}; "
               f"enrol devices with {keys / 'root.json'})")
    if config.mqtt_url:
        typer.echo(f"notices and telemetry over MQTT at {config.mqtt_url}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log, timeout_keep_alive=keep_alive,
                ws="websockets-sansio", ws_ping_interval=ws_ping or None, ws_ping_timeout=min(20.0, ws_ping) or None,
                ws_max_size=64 * 1024, **tls)   # NOTE: frames are 4 KiB at most; uvicorn's default would buffer 16 MiB


def _mqtt_options(url: str | None, ca: Path | None, advertise: str | None, broker_dir: Path | None,
                  insecure: bool) -> dict[str, Any]:
    """The ServerConfig fields of ``serve --mqtt*``; a one-line error for a bad URL, a missing CA file,
    or plain ``mqtt://`` to another host without ``--insecure-http``."""
    from edgekiln.fleet.mqtt_bridge import parse_mqtt_url
    from edgekiln.runtime.transport_security import is_loopback_host

    for option, value in (("--mqtt", url), ("--mqtt-advertise", advertise)):
        if value is None:
            continue
        host, _, tls = parse_mqtt_url(value)
        if not tls and not is_loopback_host(host) and not insecure:
            raise EdgekilnError(f"{option} {value}: plain mqtt:// to {host} sends passwords in clear; use mqtts:// "
                                "or pass --insecure-http")
    if ca is not None and not ca.is_file():
        raise EdgekilnError(f"--mqtt-ca {ca}: file not found")
    if broker_dir is not None and not broker_dir.is_dir():
        raise EdgekilnError(f"--mqtt-broker-dir {broker_dir}: not a folder (create it with `edgekiln broker config`)")
    return {"mqtt_url": url, "mqtt_ca": str(ca) if ca else None, "mqtt_advertise": advertise,
            "mqtt_broker_dir": str(broker_dir) if broker_dir else None}


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
    for d in out.get("deltas") or []:
        typer.echo(f"delta from v{d['base_version']}: {d['length']:,} bytes ({d['ratio']:.2f}x the bundle, made in "
                   f"{d['diff_s']:.1f} s)")


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
    """List devices with their active version, last contact, last error, latency and telemetry."""
    from edgekiln.fleet.client import list_devices

    rows = list_devices(server, token, tls=_tls(ca, insecure_http))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return

    _table("devices", ["device", "group", "model", "active version", "status", "last seen (UTC)", "last error",
                       "p50 ms", "p95 ms", "variant", "health", "free", "seen", "adapted"],
           [_device_row(d) for d in rows])


@devices_app.command("telemetry")
def devices_telemetry_command(name: str = typer.Argument(...),
                              limit: int = typer.Option(20, "--limit", min=1, max=100, help="Newest items to show."),
                              server: str = SERVER, token: str = TOKEN, as_json: bool = AS_JSON,
                              ca: str = CA, insecure_http: bool = INSECURE) -> None:
    """Show a device's newest telemetry items (health, variant, latency, free disk), newest first."""
    import datetime as dt

    from edgekiln.fleet.client import device_telemetry

    items = device_telemetry(server, token, name, limit=limit, tls=_tls(ca, insecure_http))
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return

    def when(t: Any) -> str:
        try:
            return dt.datetime.fromtimestamp(float(t), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (TypeError, ValueError, OverflowError, OSError):
            return ""

    keys = ("model", "ver", "variant", "health", "p50", "p95", "disk_free", "pending", "adapt")
    _table(f"telemetry of {name}", ["received (UTC)", *keys],
           [[when(i.get("received")), *("" if i.get(k) is None else str(i.get(k))[:30] for k in keys)]
            for i in items if isinstance(i, dict)])


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

    def size(v: Any) -> str:
        if not number(v) or v < 0:
            return ""
        for unit in ("B", "KB", "MB", "GB"):
            if v < 1000:
                return f"{v:.0f} B" if unit == "B" else f"{v:.1f} {unit}"
            v /= 1000
        return f"{v:.1f} TB"

    latency = d.get("latency_ms") if isinstance(d.get("latency_ms"), dict) else {}
    tele = d.get("telemetry") if isinstance(d.get("telemetry"), dict) else {}
    p50, p95 = latency.get("p50"), latency.get("p95")
    if tele and (number(tele.get("p50")) or number(tele.get("p95"))):   # live telemetry beats the install report
        p50, p95 = tele.get("p50"), tele.get("p95")
    age = tele.get("age_s")
    # NOTE: the live telemetry (the active seal), else the newest adaptation report; "-" = as published
    adapted = tele.get("adapt") or d.get("adapted")
    return [str(d.get("name") or ""), str(d.get("group") or ""), str(d.get("model") or ""),
            str(d.get("active_version") or ""), str(d.get("status") or ""), when(d.get("last_seen")),
            str(d.get("last_error") or "")[:50], number(p50), number(p95),
            str(tele.get("variant") or "")[:30], str(tele.get("health") or "")[:10], size(tele.get("disk_free")),
            f"{number(age, '.0f')} s ago" if number(age) else "", str(adapted or "-")[:16]]


def _tls(ca: str | None, insecure_http: bool) -> Any:
    from edgekiln.runtime.transport_security import TlsOptions

    return TlsOptions(ca=ca or None, insecure_http=insecure_http)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, no_wrap=i == 0)   # the name column is never cut
    for row in rows:
        table.add_row(*[str(v) for v in row])
    console = Console()
    if not console.is_terminal:   # piped into a file or grep: no 80-column squeeze
        console = Console(width=max(console.width, 200))
    console.print(table)
