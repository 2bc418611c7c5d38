"""The one extension point: a pass is a frozen config dataclass plus a run function.

A pass declares which artifact kinds it consumes and which it produces, so a recipe whose
passes do not chain fails before anything runs. ``run`` never mutates its input artifact and
returns a new one with a provenance record (see :func:`provenance_record`).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, kw_only=True)
... class NoopConfig(PassConfig):
...     note: str = ""
>>> NoopConfig.from_dict(NoopConfig(note="x").to_dict())
NoopConfig(note='x')
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import sha256_file
from edgekiln.models.artifact import ModelArtifact


def option(default: Any, help: str) -> Any:
    """A config field with its one help text (the CLI's ``--help`` reads it from the field).

    >>> from dataclasses import dataclass, fields
    >>> @dataclass(frozen=True, kw_only=True)
    ... class C(PassConfig):
    ...     ratio: float = option(0.5, "Share of channels removed.")
    >>> fields(C)[0].metadata["help"]
    'Share of channels removed.'
    """
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config. Subclasses are frozen, keyword-only dataclasses whose fields
    are plain JSON-able values (str, int, float, bool, tuples of those, nested PassConfigs)."""

    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, PassConfig) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassConfig:
        """Build the config from a dict, refusing unknown keys and a newer version."""
        data = dict(data)
        version = data.pop("version", cls.version)
        if version > cls.version:
            raise EdgekilnError(f"{cls.__name__} version {version} is newer than this edgekiln supports ({cls.version})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise EdgekilnError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            hint = hints.get(name)
            if isinstance(hint, type) and issubclass(hint, PassConfig) and isinstance(value, Mapping):
                value = hint.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise EdgekilnError(f"{cls.__name__}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class PassContext:
    """What a pass may use besides its input: a work folder, data, a seed."""

    work_dir: Path
    calib_path: Path | None = None   # npz with array ``x`` (and optionally ``y``)
    eval_path: Path | None = None    # npz with ``x`` and ``y``
    train_path: Path | None = None   # npz with ``x`` and ``y`` for passes that fine-tune (prune, distill, QAT)
    metric: str = "accuracy"
    seed: int = 0
    strict: bool = True
    quiet: bool = False
    progress: Callable[[int, int], None] | None = None   # (done, total) of a pass's long inner loop


RunFn = Callable[[ModelArtifact, Any, PassContext], ModelArtifact]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its name, config type, run function and the kinds it chains on."""

    name: str
    config_type: type[PassConfig]
    run: RunFn
    consumes: frozenset[str]
    produces: str
    summary: str
    needs_torch_source: bool = False  # the pass rebuilds the PyTorch module (prune, distill, QAT)
    produces_for: Callable[[Any], str] | None = None  # when the output kind depends on the config

    def output_kind(self, config: Any) -> str:
        return self.produces_for(config) if self.produces_for else self.produces


def provenance_record(name: str, config: PassConfig, source: ModelArtifact, **extra: Any) -> dict[str, Any]:
    """The provenance entry a pass appends: pass name, config, version and the input's hash."""
    digest = sha256_file(source.path) if source.path.is_file() else None
    return {"pass": name, "config": config.to_dict(), "input_sha256": digest, **extra}
