"""Options several commands share, declared once, and the one way a command loads its MODEL.

>>> import tempfile
>>> from edgekiln.testing.tiny import tiny_conv_onnx
>>> art = load_cli_model(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), ["input=2,1,8,8"])
>>> art.input_shapes
{'input': (2, 1, 8, 8)}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

INPUT_SHAPE_HELP = ("Input shape, repeatable: NAME=d0,d1,... for a named input (e.g. aux=1,4; NAME= for a "
                    "scalar), or d0,d1,... for the only input. Fixes dynamic dimensions; without it they come "
                    "from the --calib/--eval data, then the run folder.")


def config_option(config_type: type, name: str, *flags: str, default: Any = ...) -> Any:
    """A typer option for the pass config field ``name``: its help text (and default) come from
    the field, so an option the CLI and a pass config share is declared once.

    >>> from edgekiln.passes.quantize import QuantizeConfig
    >>> opt = config_option(QuantizeConfig, "scheme")
    >>> opt.default, opt.param_decls, opt.help
    ('int8', ('--scheme',), 'int8 | int8-dynamic | fp16 | int4-weight')
    """
    import dataclasses

    spec = next((f for f in dataclasses.fields(config_type) if f.name == name), None)
    if spec is None:
        raise ValueError(f"{config_type.__name__} has no field {name!r}")
    if default is ...:
        # NOTE: a repeatable option (tuple field) defaults to None in typer, not to ().
        plain = spec.default is not dataclasses.MISSING and not isinstance(spec.default, tuple)
        default = spec.default if plain else None
    return typer.Option(default, *(flags or ("--" + name.replace("_", "-"),)), help=spec.metadata.get("help"))


def input_shape_option() -> Any:
    """``--input-shape`` (repeatable), the same on every command that takes MODEL."""
    return typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP)


def load_cli_model(model: str | Path, input_shape: list[str] | None, *,
                   data: Mapping[str, str | Path | None] | None = None, weights: str | Path | None = None,
                   work_dir: str | Path | None = None) -> Any:
    """MODEL through the intake with the command's ``--input-shape`` values and data files."""
    from edgekiln.models.intake import load_model, parse_shapes

    return load_model(model, input_shapes=parse_shapes(input_shape), data=data, weights=weights, work_dir=work_dir)
