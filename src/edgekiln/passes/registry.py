"""The catalogue of passes: one dict, readable in one place.

Each entry maps a pass name to its :class:`PassSpec`. Adding a pass means adding one line
here; nothing registers itself by import side effect.
"""

from __future__ import annotations

from edgekiln.errors import EdgekilnError
from edgekiln.passes.base import PassSpec


def _build_registry() -> dict[str, PassSpec]:
    from edgekiln.passes import distill, export, prune, qat, quantize, simplify

    specs = [export.SPEC, simplify.SPEC, prune.SPEC, distill.SPEC, quantize.SPEC, qat.SPEC]
    return {s.name: s for s in specs}


_REGISTRY: dict[str, PassSpec] | None = None


def registry() -> dict[str, PassSpec]:
    """All registered passes by name (built once, on first use, so imports stay lazy)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build_registry()
    return _REGISTRY


def get_pass(name: str) -> PassSpec:
    try:
        return registry()[name]
    except KeyError:
        raise EdgekilnError(f"unknown pass '{name}'; known passes: {', '.join(sorted(registry()))}") from None
