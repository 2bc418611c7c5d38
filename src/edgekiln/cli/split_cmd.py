"""`edgekiln split plan` (choose the device/server cut) and `edgekiln split serve` (run the tail)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekiln.cli.options import input_shape_option, load_cli_model
from edgekiln.errors import EdgekilnError

split_app = typer.Typer(help="Edge-cloud split computing: plan the cut, serve the tail.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(split_app, name="split")


@split_app.command("plan")
def plan_command(
    model: str = typer.Argument(..., help="Model (.onnx or anything `edgekiln inspect` accepts)."),
    device_profile: str = typer.Option(None, "--device-profile", help="Device profile: its throughput relative to "
                                       "this machine scales the measured per-layer latency."),
    device_factor: float = typer.Option(None, "--device-factor", help="Device slowdown vs this machine (overrides "
                                        "the profile)."),
    bandwidth: str = typer.Option("10mbit", "--bandwidth", help="Uplink bandwidth, e.g. 10mbit."),
    rtt: str = typer.Option("20ms", "--rtt", help="Round-trip time."),
    int8: bool = typer.Option(False, "--int8-transfer", help="Send cut tensors as int8 (4x fewer bytes)."),
    input_shape: list[str] = input_shape_option(),
    out: Path = typer.Option(None, "--out", help="Write head.onnx, tail.onnx and plan.json here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Choose the cut that minimizes end-to-end latency, with the bandwidth breakpoint table."""
    import numpy as np

    from edgekiln.runtime.split_plan import breakpoints, plan
    from edgekiln.runtime.split_profile import split_graph
    from edgekiln.targets.units import parse_bandwidth_bps, parse_duration_ms

    art = load_cli_model(model, input_shape)
    factor = device_factor if device_factor is not None else _profile_factor(device_profile)
    feeds = {s.name: np.zeros(s.shape, s.dtype) for s in art.inputs}
    graph = split_graph(art.path, feeds, device_factor=factor, int8_transfer=int8)
    bw, rtt_ms = parse_bandwidth_bps(bandwidth), parse_duration_ms(rtt)
    best = plan(graph, bandwidth_bps=bw, rtt_ms=rtt_ms)
    table = breakpoints(graph, rtt_ms=rtt_ms)
    result = {
        "model": str(model), "device_factor": factor, "bandwidth_bps": bw, "rtt_ms": rtt_ms, "int8_transfer": int8,
        "choice": {"label": best.label, "cut_tensors": list(best.sent), "device_nodes": sorted(best.device_nodes),
                   "latency_ms": best.latency_ms, **best.parts},
        "breakpoints": [{"from_bps": lo, "label": s.label, "cut_tensors": list(s.sent)}
                        for lo, s in zip([0.0, *table.bandwidths], table.splits, strict=True)],
    }
    if out and best.sent:
        from edgekiln.runtime.split_exec import cut_model

        head, tail = cut_model(art.path, list(best.sent), out)
        result["files"] = {"head": str(head), "tail": str(tail)}
    if out:
        from edgekiln.fileio import atomic_write_json

        atomic_write_json(Path(out) / "plan.json", result)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"best at {bandwidth}, RTT {rtt}: {best.label} -> {best.latency_ms:.3f} ms "
               f"(device {best.parts['device_ms']:.3f}, transfer {best.parts['transfer_ms']:.3f}, "
               f"RTT {best.parts['rtt_ms']:.1f}, server {best.parts['server_ms']:.3f})")
    for row in result["breakpoints"]:
        typer.echo(f"  from {row['from_bps'] / 1e6:10.3f} Mbit/s: {row['label']}")


@split_app.command("serve")
def serve_command(
    tail: Path = typer.Argument(..., help="tail.onnx written by `edgekiln split plan --out`."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8090, "--port"),
    threads: int = typer.Option(1, "--threads"),
    token_file: Path = typer.Option(None, "--token-file", help="File of accepted device tokens, one per line "
                                    "(else EDGEKILN_SPLIT_TOKEN)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Accept requests without a token (loopback --host only)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="TLS certificate chain (PEM); serve https."),
    tls_key: Path = typer.Option(None, "--tls-key", help="TLS private key (PEM, mode 0600)."),
    insecure_http: bool = typer.Option(False, "--insecure-http",
                                       help="Allow plain http on a --host other than loopback (tokens in clear)."),
) -> None:
    """Serve the tail of a split model over HTTP (POST /v1/tail with an npz body)."""
    from edgekiln.runtime.transport_security import is_loopback_host, server_tls_kwargs

    if not tail.is_file():
        raise EdgekilnError(f"{tail}: file not found")
    tls = server_tls_kwargs(tls_cert, tls_key)
    if not tls and not is_loopback_host(host) and not insecure_http:
        raise EdgekilnError(f"refusing to serve plain http on {host}: tokens would travel in clear; give "
                            "--tls-cert FILE --tls-key FILE, or pass --insecure-http")
    tokens = _split_tokens(token_file)
    if no_auth:
        if tokens:
            raise EdgekilnError("give --no-auth or tokens (--token-file, EDGEKILN_SPLIT_TOKEN), not both")
        if not is_loopback_host(host):
            raise EdgekilnError(f"--no-auth is allowed only on a loopback --host, not {host}")
    elif not tokens:
        raise EdgekilnError("no split tokens: pass --token-file FILE or set EDGEKILN_SPLIT_TOKEN "
                            "(or --no-auth on a loopback --host)")
    try:
        import uvicorn

        from edgekiln.runtime.split_server import create_app, token_hash
    except ImportError:
        raise EdgekilnError("split serve needs fastapi and uvicorn: pip install 'edgekiln[serve]'") from None
    hashes = None if no_auth else frozenset(token_hash(t) for t in tokens)
    uvicorn.run(create_app(tail, threads=threads, token_hashes=hashes), host=host, port=port, log_level="warning",
                **tls)


def _split_tokens(token_file: Path | None) -> list[str]:
    import os

    if token_file is not None:
        if not token_file.is_file():
            raise EdgekilnError(f"{token_file}: token file not found")
        text = token_file.read_text()
    else:
        text = os.environ.get("EDGEKILN_SPLIT_TOKEN", "")
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise EdgekilnError(f"split token of {len(short[0])} characters refused: use at least 16")
    return tokens


def _profile_factor(name: str | None) -> float:
    """How much slower the profile's device is than this machine (int8/fp32 peak MAC ratio)."""
    if name is None:
        return 1.0
    from edgekiln.targets.profiles import load_profile

    device, host = load_profile(name), load_profile("host")
    d = (device.peak_macs_per_s or {}).get("fp32") or 0
    h = (host.peak_macs_per_s or {}).get("fp32") or 0
    if not d or not h:
        raise EdgekilnError(f"profile {name}: no fp32 throughput to compare with this machine; pass --device-factor")
    return max(1.0, h / d)
