"""The `merv` command line: parse arguments, call the library, print results. Nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MERV video LLMs with cached frozen-encoder features.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature stores.")
app.add_typer(store_app, name="store")
console = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@store_app.command("info")
def store_info_cmd(
    path: str = typer.Argument(..., help="store path or fsspec URL"),
    as_json: bool = typer.Option(False, "--json", help="print the full JSON"),
) -> None:
    """Encoders, fingerprints, shapes, encodings, committed / failed / pending counts, bytes."""
    from merv.store import FeatureStore, StoreError, store_info

    try:
        info = store_info(FeatureStore.open(path))
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    console.print(f"[bold]{info['url']}[/]  samples={info['samples']} rows={info['rows']} grid="
                  f"{'native' if info['grid'] is None else 'x'.join(map(str, info['grid']))} "
                  f"samples/shard={info['samples_per_shard']}")
    table = Table("group", "grid (t,h,w)", "dim", "encoding", "kind", "committed", "failed", "pending", "KB/sample")
    for g in info["encoders"]:
        for kind, s in g["status"].items():
            bps = g["bytes_per_sample"][kind]
            table.add_row(g["key"], str(tuple(g["grid"])), str(g["dim"]), g["encoding"], kind, str(s["committed"]),
                          str(s["failed"]), str(s["pending"]), "-" if bps is None else f"{bps / 1024:.1f}")
    console.print(table)
    for g in info["encoders"]:
        console.print(f"{g['key']}: fingerprint {g['fingerprint']}, {g['bytes_on_disk'] / 2**20:.2f} MiB on disk")


@store_app.command("verify")
def store_verify_cmd(path: str = typer.Argument(..., help="store path or fsspec URL")) -> None:
    """Re-read every committed chunk (checksums); name corrupt shards and samples; exit 1 if any."""
    from merv.store import FeatureStore, StoreError, verify_store

    try:
        store = FeatureStore.open(path)
        report = verify_store(store)
    except StoreError as exc:
        _fail(str(exc))
    for problem in report.problems:
        console.print(f"[red]CORRUPT[/] {problem}")
    status = "clean" if report.ok else f"{len(report.problems)} problem(s)"
    console.print(f"verified {report.shards_checked} committed shards, {report.samples_checked} samples "
                  f"({report.uncommitted_shards} not yet committed): {status}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), help="output directory")) -> None:
    """Main job on embedded defaults (currently: the store round trip on generated data)."""
    from merv.pipelines.roundtrip import run_roundtrip

    result = run_roundtrip(str(out / "roundtrip.zarr"))
    for name, err in result.max_abs_error.items():
        console.print(f"{name:20s} max |error| {err:.2e}  within documented bound: {result.within_bound[name]}  "
                      f"bytes/video {result.bytes_per_sample[name]['video']:.0f}")
    console.print(f"round trip of {result.samples} samples x {len(result.groups)} encodings; verify: "
                  f"{'clean' if result.verified else 'FAILED'}")
    if not (result.verified and all(result.within_bound.values())):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
