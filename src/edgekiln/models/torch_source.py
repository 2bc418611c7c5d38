"""Rebuild a PyTorch module from a factory spec (``pkg.mod:fn`` or ``path/file.py:fn``).

Pruning, distillation and QAT need the PyTorch module, not just its ONNX export; a
:class:`~edgekiln.models.artifact.TorchSource` records how to rebuild it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.models.artifact import TorchSource


def is_factory_spec(spec: str) -> bool:
    """True for ``something.py:name`` or ``dotted.module:name`` (not a Windows drive letter)."""
    if ":" not in spec:
        return False
    target, _, name = spec.rpartition(":")
    return bool(name.isidentifier() and target and (target.endswith(".py") or _is_dotted(target)))


def resolve_factory(spec: str) -> Any:
    """Import the callable named by ``spec``."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise EdgekilnError(f"{target}: file not found")
        mod_name = f"_edgekiln_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise EdgekilnError(f"{target}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise EdgekilnError(f"{target}: importing it failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise EdgekilnError(f"{spec}: cannot import module '{target}' ({exc})") from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise EdgekilnError(f"{spec}: '{name}' is not a callable in {target}")
    return fn


def build_module(source: TorchSource) -> Any:
    """Build the module and load its state_dict (if any); returns it in eval mode."""
    import torch

    fn = resolve_factory(source.factory)
    try:
        module = fn(**dict(source.factory_kwargs))
    except Exception as exc:  # noqa: BLE001
        raise EdgekilnError(f"{source.factory}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise EdgekilnError(f"{source.factory}: returned {type(module).__name__}, not a torch.nn.Module")
    if source.state_dict is not None:
        state = load_state_dict(source.state_dict)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise EdgekilnError(f"{source.state_dict}: does not match the model from {source.factory}: {detail}") from exc
    return module.eval()


def load_state_dict(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    if not Path(path).is_file():
        raise EdgekilnError(f"{path}: file not found")
    try:
        # NOTE: weights_only=True refuses arbitrary pickled code: a checkpoint is data.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise EdgekilnError(f"{path}: not a PyTorch state_dict ({str(exc).splitlines()[0][:200]})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgekilnError(f"{path}: expected a state_dict (a dict of tensors), found {type(state).__name__}")
    return state


def _is_dotted(target: str) -> bool:
    return all(part.isidentifier() for part in target.split("."))
