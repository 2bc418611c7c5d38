"""The MQTT broker next to the update server: `edgekiln broker config DIR`.

It writes a starter Mosquitto configuration (``mosquitto.conf``, ``passwd``, ``acl``, all mode
0600) and the server user's password (``server-password``, unless ``EDGEKILN_MQTT_PASSWORD`` is
set). Run ``mosquitto -c DIR/mosquitto.conf`` and start the server with ``--mqtt URL
--mqtt-broker-dir DIR``: it adds and removes device users there and reloads the broker.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import typer

from edgekiln.errors import EdgekilnError

broker_app = typer.Typer(help="Configure the MQTT broker (Mosquitto) for update notices and telemetry.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(broker_app, name="broker")


@broker_app.command("config")
def broker_config_command(
    folder: Path = typer.Argument(..., help="Folder for mosquitto.conf, passwd, acl (what --mqtt-broker-dir reads)."),
    port: int = typer.Option(8883, "--port", help="The broker's listening port."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address to listen on (0.0.0.0: every interface)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="TLS certificate chain (PEM): the listener is mqtts."),
    tls_key: Path = typer.Option(None, "--tls-key", help="TLS private key (PEM)."),
    insecure: bool = typer.Option(False, "--insecure-mqtt",
                                  help="Allow a plain MQTT listener on an address other than loopback."),
) -> None:
    """Write a starter Mosquitto config; device users already in FOLDER/passwd are kept."""
    from edgekiln.fleet import mosquitto
    from edgekiln.fleet.mqtt_bridge import PASSWORD_ENV, PASSWORD_FILE
    from edgekiln.runtime.transport_security import is_loopback_host

    if (tls_cert is None) != (tls_key is None):
        raise EdgekilnError("give --tls-cert and --tls-key together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise EdgekilnError(f"{path}: file not found")
    if tls_cert is None and not is_loopback_host(bind) and not insecure:
        raise EdgekilnError(f"refusing a plain MQTT listener on {bind}: device passwords would travel in clear; "
                            "give --tls-cert FILE --tls-key FILE, or pass --insecure-mqtt")
    if not 0 < port < 65536:
        raise EdgekilnError(f"--port {port}: must be in 1..65535")
    if folder.exists() and not folder.is_dir():
        raise EdgekilnError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    password = os.environ.get(PASSWORD_ENV)
    pw_file = folder / PASSWORD_FILE
    if not password:
        if pw_file.is_file() and pw_file.read_text().strip():
            password = pw_file.read_text().strip()
        else:
            password = secrets.token_urlsafe(32)
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
    passwd = folder / "passwd"
    kept = [line for line in (passwd.read_text().splitlines() if passwd.is_file() else [])
            if line.strip() and not line.startswith(mosquitto.SERVER_USER + ":")]
    conf = mosquitto.write_broker_files(folder, kept, server_password=password, port=port, bind=bind,
                                        tls=(tls_cert, tls_key) if tls_cert is not None and tls_key is not None
                                        else None)
    scheme = "mqtts" if tls_cert is not None else "mqtt"
    host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    typer.echo(f"wrote {conf} (+ passwd with {len(kept)} device user(s), acl); the server user's password is in "
               f"{'$' + PASSWORD_ENV if os.environ.get(PASSWORD_ENV) else pw_file}")
    typer.echo(f"start the broker:  mosquitto -c {conf}")
    typer.echo(f"start the server:  edgekiln serve --mqtt {scheme}://{host}:{port} --mqtt-broker-dir {folder} ...")
