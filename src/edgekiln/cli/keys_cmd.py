"""Key management of the update server: `keys init`, `keys rotate ROLE`, `keys renew-root`.

The root key signs every root version and never needs to be on the server: keep ``--root-key``
offline and bring it out only for these commands. A running server picks up a rotation at its
next request (it checks the new root against the old one and re-signs what depends on the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgekiln.errors import EdgekilnError

if TYPE_CHECKING:
    from edgekiln.fleet.tuf_repo import TufExpiry

keys_app = typer.Typer(help="Create and rotate the update server's signing keys (root key kept offline).",
                       no_args_is_help=True)
ROOT_KEY = typer.Option(..., "--root-key", help="The offline root key (PEM, Ed25519).", show_default=False)
KEYS = typer.Option(Path("edgekiln-fleet/keys"), "--keys", help="The server's key folder.")
EXPIRY = typer.Option(None, "--expiry", help="Validity in days, e.g. root=365 (only root applies here).")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


def _expiry(text: str | None) -> TufExpiry:
    from edgekiln.cli.fleet_cmd import parse_expiry

    return parse_expiry(text)


@keys_app.command("init")
def keys_init_command(
    keys: Path = typer.Argument(..., help="The key folder to create (what `serve --keys` reads)."),
    root_key: Path = typer.Option(..., "--root-key", help="Where the root key goes (created if missing); keep it "
                                  "offline, `serve` does not need it.", show_default=False),
    expiry: str = EXPIRY,
) -> None:
    """Create the online keys and both signed roots (image and director) v1."""
    from edgekiln.fleet.keys import init_keys

    root_json = init_keys(keys, root_key, expiry=_expiry(expiry))
    typer.echo(f"keys in {keys}; enrol devices with {root_json} and {keys / 'director-root.json'}; "
               f"move {root_key} offline")


@keys_app.command("rotate")
def keys_rotate_command(
    role: str = typer.Argument(..., help="timestamp, snapshot, targets or director."),
    keys: Path = KEYS,
    root_key: Path = ROOT_KEY,
    expiry: str = EXPIRY,
) -> None:
    """Replace one online key: a new key, root v+1 naming it, the old key kept as ROLE.<keyid>.retired.pem."""
    from edgekiln.fleet.keys import ONLINE_KEYS, rotate

    if role not in ONLINE_KEYS:
        raise EdgekilnError(f"keys rotate: unknown role '{role}' (use {', '.join(ONLINE_KEYS)}; the root key is "
                            "replaced by publishing a root signed by both keys, not supported yet)")
    version = rotate(keys, role, root_key, expiry=_expiry(expiry))
    name = "director-root.json" if role == "director" else "root.json"
    typer.echo(f"rotated {role}: {keys / 'roots' / f'{version}.{name}'}; the server picks it up at its next request")


@keys_app.command("renew-root")
def keys_renew_root_command(
    keys: Path = KEYS,
    root_key: Path = ROOT_KEY,
    expiry: str = EXPIRY,
) -> None:
    """Sign both roots again with a new expiry (same keys)."""
    from edgekiln.fleet.keys import renew_root

    versions = renew_root(keys, root_key, expiry=_expiry(expiry))
    typer.echo("renewed " + ", ".join(f"{repo} root v{v}" for repo, v in versions.items()))
