"""The deployment bundle manifest: a versioned, validated description of model variants.

A bundle is a folder (or a ``.tar`` of it) holding ``manifest.json`` and the model files it
names. Runtime, OTA updates and C export all read the same manifest. Validation refuses a
bundle with the reason: unknown version, missing field, a file that is absent or whose SHA-256
does not match, a path that escapes the bundle.

An optional top-level ``placements`` maps a variant to a ``placement.json`` in the bundle (its
segments, one per compute unit, from ``edgekiln place``). It is top-level on purpose: readers
before it ignore top-level keys they do not know and run the variant's whole file, while an
unknown key inside a variant would make them refuse the manifest.

Two more optional top-level keys, for on-device learning (:mod:`edgekiln.runtime.adapt`), work
the same way: ``learn`` maps a variant to its learning files (``{"cut", "scope", "replay",
"holdout", "classes", "storage"}``: the feature tensor, the replay buffer and held-out features
of the old classes, written by ``edgekiln bundle --learn-data``), and ``adaptation`` describes a
bundle that learning on the device made (``{"version", "id", "n", "base_sha256", "variant",
"scope", "classes_before", "classes_after", "samples", "replay_bytes", "created", "gate"}``).

Imports only the standard library and numpy: this runs on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgekiln.errors import EdgekilnError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
LEARN_FILES = ("cut", "replay", "holdout")   # the string fields every `learn` entry has


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str                   # numpy dtype name of what the caller passes / receives
    scale: float | None = None   # quantization parameters when the tensor itself is int8
    zero_point: int | None = None


@dataclass(frozen=True)
class Variant:
    """One model file in the bundle with what is known about it."""

    name: str
    file: str
    sha256: str
    precision: str                       # fp32 | fp16 | int8 | int4
    size_bytes: int
    metric: float | None = None
    metric_name: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)   # runtime -> measured p50
    macs: int | None = None
    provenance: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    default_variant: str
    sample_inputs: str | None = None     # npz in the bundle: inputs for the health check
    sample_outputs: str | None = None    # npz: expected outputs of the default variant
    health_tolerance: float = 1e-3       # max abs difference allowed in the health check
    schema_version: int = MANIFEST_VERSION
    placements: dict[str, str] = field(default_factory=dict)   # variant -> placement.json in the bundle
    learn: dict[str, dict[str, Any]] = field(default_factory=dict)   # variant -> its learning files
    adaptation: dict[str, Any] | None = None   # set in a bundle that on-device learning made

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise EdgekilnError(f"bundle '{self.name}' has no variant '{name}'; it has: "
                            + ", ".join(v.name for v in self.variants))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("placements", "learn", "adaptation"):
            if not data[key]:
                del data[key]   # NOTE: manifests without them stay byte-for-byte as before
        return data

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "manifest") -> Manifest:
        try:
            version = data.get("schema_version")
            if version != MANIFEST_VERSION:
                raise EdgekilnError(f"{where}: schema_version {version!r} is not supported (expected {MANIFEST_VERSION})")
            variants = tuple(Variant(**{**v, "latency_ms": dict(v.get("latency_ms") or {}),
                                        "provenance": tuple(v.get("provenance") or ())})
                             for v in data["variants"])
            specs = {key: tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in data[key])
                     for key in ("inputs", "outputs")}
            fields = {k: data[k] for k in ("name", "version", "created", "default_variant")}
            optional = {k: data[k] for k in ("sample_inputs", "sample_outputs", "health_tolerance") if k in data}
            placements = data.get("placements") or {}
            if not isinstance(placements, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                           for k, v in placements.items()):
                raise EdgekilnError(f"{where}: placements must map variant names to placement.json paths")
            learn, adaptation = data.get("learn") or {}, data.get("adaptation") or None
            if not isinstance(learn, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                      and all(isinstance(v.get(f), str) for f in LEARN_FILES)
                                                      for k, v in learn.items()):
                raise EdgekilnError(f"{where}: learn must map variant names to {{{', '.join(LEARN_FILES)}, ...}}")
            if adaptation is not None and not (isinstance(adaptation, dict) and isinstance(adaptation.get("id"), str)):
                raise EdgekilnError(f"{where}: adaptation must be an object with an id")
            manifest = Manifest(**fields, **optional, inputs=specs["inputs"], outputs=specs["outputs"],
                                variants=variants, placements=dict(placements), learn=dict(learn),
                                adaptation=adaptation)
        except KeyError as exc:
            raise EdgekilnError(f"{where}: missing field {exc}") from None
        except TypeError as exc:
            raise EdgekilnError(f"{where}: malformed entry ({exc})") from None
        if not manifest.variants:
            raise EdgekilnError(f"{where}: lists no model variants")
        manifest.variant(manifest.default_variant)
        names = [v.name for v in manifest.variants]
        if len(set(names)) != len(names):
            raise EdgekilnError(f"{where}: duplicate variant names {names}")
        for key, named in (("placements", manifest.placements), ("learn", manifest.learn)):
            unknown = sorted(set(named) - set(names))
            if unknown:
                raise EdgekilnError(f"{where}: {key} name variant(s) {', '.join(unknown)}; the variants are "
                                    + ", ".join(names))
        return manifest


def safe_member(root: Path, relative: str) -> Path:
    """Resolve ``relative`` inside ``root``, refusing absolute paths and ``..`` escapes."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not relative:
        raise EdgekilnError(f"bundle path '{relative}' is not inside the bundle")
    return root / Path(*pure.parts)


def load_manifest(bundle_dir: str | Path, *, verify_files: bool = True) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``; with ``verify_files`` also check every
    model file exists and matches its SHA-256."""
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EdgekilnError(f"{root}: not a bundle (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekilnError(f"{path}: not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data, str(path))
    if verify_files:
        for v in manifest.variants:
            file = safe_member(root, v.file)
            if not file.is_file():
                raise EdgekilnError(f"{root}: variant '{v.name}' file {v.file} is missing")
            digest = sha256_of(file)
            if digest != v.sha256:
                raise EdgekilnError(f"{root}: variant '{v.name}' file {v.file} does not match its SHA-256 "
                                    f"(manifest {v.sha256[:12]}..., file {digest[:12]}...)")
        learn_files = [e[k] for e in manifest.learn.values() for k in ("replay", "holdout")]
        for extra in (manifest.sample_inputs, manifest.sample_outputs, *manifest.placements.values(), *learn_files):
            if extra and not safe_member(root, extra).is_file():
                raise EdgekilnError(f"{root}: {extra} named in the manifest is missing")
    return manifest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
