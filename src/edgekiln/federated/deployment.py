"""Flower deployment: the same apps as separate processes (``flower-superlink``, ``flower-supernode``).

``flwr run`` submits a Flower App (a folder with ``pyproject.toml``, packed as a FAB) to a
SuperLink; :func:`write_flower_app` writes that folder for edgekiln's apps. Its two modules
only re-export :data:`edgekiln.federated.server_app.app` and
:data:`edgekiln.federated.client_app.app`, so every process needs edgekiln installed (as on a
device that runs the edgekiln runtime) and nothing is installed at run time. The settings
become the app's run config; ``out-dir`` is where the ServerApp writes the run folder.

A federation on one machine, as ``tests/integration/test_federated_deployment.py`` runs it
(Flower 1.42 serves the Fleet, Control and ServerAppIo APIs of the SuperLink on one HTTP port)::

    flower-superlink --insecure --port 9091
    flower-supernode --insecure --superlink 127.0.0.1:9091 --port 9094 \
        --node-config "partition-id=0 num-partitions=3"          # one per client, each its own --port
    flwr run APP_DIR local --stream     # 'local': [superlink.local] address = "127.0.0.1:9091",
                                        # insecure = true, in $FLWR_HOME/config.toml

>>> import tempfile
>>> from edgekiln.federated.settings import FederatedSettings
>>> d = write_flower_app(tempfile.mkdtemp(), FederatedSettings(clients=3, rounds=1), out_dir="/tmp/x")
>>> sorted(p.name for p in d.iterdir())
['edgekiln_flower', 'pyproject.toml']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.federated.server_app import OUT_DIR_KEY
from edgekiln.federated.settings import FederatedSettings

_MODULES = {
    "__init__.py": '"""edgekiln\'s Flower apps, packaged for `flwr run`."""\n',
    "server.py": '"""The ServerApp."""\n\nfrom edgekiln.federated.server_app import app\n\n__all__ = ["app"]\n',
    "client.py": '"""The ClientApp."""\n\nfrom edgekiln.federated.client_app import app\n\n__all__ = ["app"]\n',
}


def write_flower_app(dest: str | Path, settings: FederatedSettings, *, out_dir: str | Path) -> Path:
    """Write a Flower App folder for ``settings`` into ``dest``; return ``dest``."""
    from edgekiln.fileio import atomic_write_text

    root = Path(dest)
    (root / "edgekiln_flower").mkdir(parents=True, exist_ok=True)
    for name, text in _MODULES.items():
        atomic_write_text(root / "edgekiln_flower" / name, text)
    config = {**settings.to_run_config(), OUT_DIR_KEY: str(Path(out_dir).resolve())}
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "edgekiln-federated"', 'version = "1.0.0"',
        'description = "edgekiln federated fine-tuning (Flower apps)"', 'license = "Apache-2.0"', "dependencies = []",
        "", "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "edgekiln"', "",
        "[tool.flwr.app.components]", 'serverapp = "edgekiln_flower.server:app"',
        'clientapp = "edgekiln_flower.client:app"', "",
        "[tool.flwr.app.config]", *[f"{k} = {_toml(v)}" for k, v in config.items()], "",
    ]
    atomic_write_text(root / "pyproject.toml", "\n".join(lines))
    return root


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
