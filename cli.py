"""The `merv` command line: parse arguments, call the library, print results. Nothing else.

Errors caused by the user's input (every `merv.MervError`, and the common library errors a bad
path or file produces) are printed as one line naming the input and the fix, exit status 2; a
traceback is shown only for genuine bugs, or for every error with `merv --debug` / MERV_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TextIO

import typer
from rich.console import Console
from rich.table import Table

from merv import MervError

console = Console()
err_console = Console(stderr=True)
_DEBUG = {"on": os.environ.get("MERV_DEBUG", "") not in ("", "0")}


def user_error_line(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug (shown with its traceback)."""
    import yaml

    if isinstance(exc, MervError):
        text = str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        text = f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a UTF-8 JSON / JSONL / CSV / YAML file"
    elif isinstance(exc, json.JSONDecodeError):
        text = f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; fix the file or pass another"
    elif isinstance(exc, yaml.YAMLError):
        text = f"invalid YAML: {' '.join(str(exc).split())}"
    elif isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        what = {FileNotFoundError: "no such file or directory", NotADirectoryError: "not a directory",
                IsADirectoryError: "is a directory, not a file", PermissionError: "permission denied"}
        reason = next((v for k, v in what.items() if isinstance(exc, k)), exc.strerror)
        text = f"{exc.filename}: {reason}; check the path" if exc.filename else str(exc)
    elif isinstance(exc, ImportError) and "install" in str(exc).lower():
        text = str(exc)  # an optional dependency a URL or option needs (e.g. s3fs for s3://)
    else:
        return None
    return " ".join(text.split())


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if _DEBUG["on"]:
                raise
            _fail("interrupted (Ctrl-C)", 130)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs right here
            line = user_error_line(exc)
            if line is None or _DEBUG["on"]:
                raise
            _fail(line)

    return run


class _App(typer.Typer):
    """A Typer whose every command reports user errors in one line (see `user_error_line`)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(_friendly_errors(fn))
            return fn

        return decorate


app = _App(add_completion=False, no_args_is_help=True, help="MERV video LLMs with cached frozen-encoder features.")
store_app = _App(no_args_is_help=True, help="Inspect and check feature stores.")
app.add_typer(store_app, name="store")
model_app = _App(no_args_is_help=True, help="Model recipes: sizes and FLOPs.")
app.add_typer(model_app, name="model")


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of every error (also MERV_DEBUG=1)"),
) -> None:
    if debug:
        _DEBUG["on"] = True


def _json_stdout() -> TextIO:
    """Reserve standard output for one JSON document. From here on, whatever else writes to
    file descriptor 1 (Ray's driver-side log lines, worker processes, C libraries) lands on
    stderr; the returned stream writes to the original stdout. In-process callers whose stdout
    is not a file descriptor (tests' CliRunner) get sys.stdout as it is."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    if fd != 1:
        return sys.stdout
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(saved, "w")


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@store_app.command("info")
def store_info_cmd(
    path: str = typer.Argument(..., help="store path or fsspec URL"),
    as_json: bool = typer.Option(False, "--json", help="print the full JSON"),
) -> None:
    """Encoders, fingerprints, shapes, encodings, committed / failed / pending counts, bytes."""
    from merv.store import FeatureStore, store_info

    info = store_info(FeatureStore.open(path))
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
    from merv.store import FeatureStore, verify_store

    report = verify_store(FeatureStore.open(path))
    for problem in report.problems:
        console.print(f"[red]CORRUPT[/] {problem}")
    status = "clean" if report.ok else f"{len(report.problems)} problem(s)"
    console.print(f"verified {report.shards_checked} committed shards, {report.samples_checked} samples "
                  f"({report.uncommitted_shards} not yet committed): {status}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("extract")
def extract_cmd(
    source: Optional[str] = typer.Argument(
        None, help="manifest (.jsonl/.json/.csv), directory, or WebDataset .tar (glob / comma list); "
                   "omit to (re-)extract the samples the store already lists"),
    store: str = typer.Option(..., "--store", help="output feature store (path or fsspec URL)"),
    encoders: str = typer.Option("dinov2,siglip,vivit,languagebind", help="comma-separated encoder names"),
    weights: Optional[str] = typer.Option(None, help="directory with the encoders' weights (else the HF cache, offline); 'random': random init (benchmarks)"),
    grid: str = typer.Option("8x8", help="cache pooled to HxW (least I/O) or 'native' (every token-count ablation)"),
    encoding: str = typer.Option("fp16", help="fp16 | bitround | int8"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join this Ray cluster (else RAY_ADDRESS, else embedded)"),
    size: str = typer.Option("paper", help="'paper' (published weights), or random-init 'small' (benchmarks) / 'tiny' (tests, demo)"),
    workers: Optional[int] = typer.Option(None, help="encoder actors (default: one per GPU, else 1)"),
    batch_size: int = typer.Option(8, help="clips per encoder forward (across videos)"),
    inflight: int = typer.Option(2, help="shards open per encoder actor (bounds the actors' feature buffers)"),
    max_inflight_bytes: Optional[str] = typer.Option(
        None, help="decoded frames alive at once, e.g. 4GiB or 500MB (default: a quarter of Ray's object store)"),
    stop_grace: float = typer.Option(60.0, help="seconds shards may finish after SIGINT / SIGTERM before they are abandoned"),
    decode_cpus: float = typer.Option(1.0, help="CPUs per decode task"),
    worker_cpus: Optional[float] = typer.Option(None, help="CPUs reserved per actor (default 1 with GPUs, 0 on CPU-only)"),
    torch_threads: Optional[int] = typer.Option(None, help="torch threads per actor (default: the CPUs it may use)"),
    device: str = typer.Option("auto", help="encoder device: auto | cpu | cuda"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="redo shards that hold recorded failures"),
    samples_per_shard: Optional[int] = typer.Option(None, help="samples per shard of a new store (else ~128 MiB shards)"),
    allow_download: bool = typer.Option(False, "--allow-download", help="let missing weights be fetched from the Hub"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON document on stdout (logs go to stderr)"),
) -> None:
    """Decode every video once, run each frozen encoder once, write the feature store.

    A re-run skips committed shards. Exit status 1 when a shard could not be written; after
    SIGINT / SIGTERM, 128 + the signal number (committed shards are kept: re-run to continue).
    """
    from rich.markup import escape

    from merv.extract.job import ExtractOptions, parse_bytes, run_extraction

    out = _json_stdout() if as_json else None
    opts = ExtractOptions(
        encoders=[e.strip() for e in encoders.split(",") if e.strip()], size=size, weights=weights, grid=grid,
        encoding=encoding, workers=workers, batch_size=batch_size, inflight_per_worker=inflight,
        retry_failed=retry_failed, ray_address=ray_address, device=device, allow_download=allow_download,
        samples_per_shard=samples_per_shard, decode_cpus=decode_cpus, worker_cpus=worker_cpus,
        torch_threads=torch_threads, stop_grace_s=stop_grace,
        max_inflight_bytes=parse_bytes(max_inflight_bytes, "--max-inflight-bytes") if max_inflight_bytes else None,
    )
    summary = run_extraction(source, store, opts, console=Console(stderr=True), show_progress=not quiet)
    if out is not None:
        out.write(json.dumps(summary.to_json(), indent=2, default=str) + "\n")
        out.flush()
    else:
        for sid, reason in list(summary.failed.items())[:20]:
            console.print(f"[yellow]failed[/] {escape(sid)}: {escape(reason)}", highlight=False, soft_wrap=True)
        if len(summary.failed) > 20:
            console.print(f"... and {len(summary.failed) - 20} more failures (see `merv store info {store}`)")
        for shard, reason in list(summary.unfinished.items())[:20]:
            console.print(f"[red]not written[/] {shard}: {escape(reason)}", highlight=False, soft_wrap=True)
        console.print(summary.line(), highlight=False, soft_wrap=True, markup=False)
    if summary.stopped:
        import signal

        raise typer.Exit(128 + int(signal.Signals[summary.stopped]))
    if not summary.ok:
        raise typer.Exit(1)


@model_app.command("info")
def model_info_cmd(
    recipe: str = typer.Argument("merv-frozen", help="recipe name (merv-frozen, merv-full, dinov2-single, ...)"),
    seq_len: Optional[int] = typer.Option(None, help="LLM sequence length for FLOPs (default: the recipe's max length)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Parameters per component and analytic FLOPs per sample, from a meta-device build (no weights)."""
    from merv.pipelines.recipes import get_recipe

    report = get_recipe(recipe).report(seq_len=seq_len).to_dict()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table("component", "parameters (M)", "GFLOPs / sample")
    flops = report["flops"]
    for name, n in report["params"].items():
        table.add_row(name, f"{n / 1e6:,.1f}", "" if name not in flops else f"{flops[name] / 1e9:,.1f}")
    table.add_row("connector (projectors + fusion)", "", f"{flops['connector'] / 1e9:,.1f}")
    console.print(table)
    enc = sum(v for k, v in flops.items() if k.startswith("encoder/"))
    console.print(f"total {report['total_params'] / 1e6:,.1f}M parameters; {report['total_flops'] / 1e12:,.2f} TFLOPs per "
                  f"training sample at seq_len {report['seq_len']} (LLM forward + backward, encoders forward); "
                  f"encoders are {100 * enc / report['total_flops']:.1f}% of it: what feature caching removes")


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command("train")
def train_cmd(
    data: list[str] = typer.Option(..., "--data", help="instruction data (LLaVA / Video-LLaVA JSON or JSONL); repeatable"),
    store: list[str] = typer.Option([], "--store", help="feature store for the data (one, or one per --data)"),
    recipe: str = typer.Option("tiny", help="merv-frozen | merv-full | <encoder>-single | tiny | ..."),
    stage: Optional[str] = typer.Option(None, help="stage of the recipe: align | finetune | full-align (default: its last)"),
    out: str = typer.Option("runs/train", "--out", help="run directory (config, metrics, checkpoints, export)"),
    encoders: Optional[str] = typer.Option(None, help="encoder subset, e.g. dinov2,siglip,vivit (no re-extraction)"),
    projector: Optional[str] = typer.Option(None, help="avg2d | avg3d | conv2d | conv3d | attentive | all_tokens | cls"),
    tokens_per_frame: Optional[int] = typer.Option(None, help="square token count per frame: 1, 4, 16, 64, 100, 144, 256"),
    fusion: Optional[str] = typer.Option(None, help="cross_attention | cross_attention_plain | concat_sequence | concat_channel | learnable_scalar | fixed_mix"),
    llm: Optional[str] = typer.Option(None, help="override the recipe's LLM (registry id or local HF directory)"),
    init_from: Optional[str] = typer.Option(None, help="start from a previous stage's export directory"),
    global_batch_size: Optional[int] = typer.Option(None, help="samples per optimizer step (default: the recipe's)"),
    micro_batch_size: Optional[int] = typer.Option(None, help="samples per forward per rank (gradient accumulation fills the rest)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: the recipe's)"),
    epochs: Optional[int] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    max_length: Optional[int] = typer.Option(None, help="truncate conversations to this many tokens"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(0, help="checkpoint every N steps (always at the end)"),
    resume: bool = typer.Option(
        False, "--resume", help="continue the run in --out from its latest checkpoint (verified; falls back to the newest "
                                "intact one and says so); refuse when there is none"),
    resume_auto: bool = typer.Option(
        False, "--resume-auto", help="like --resume, but start fresh when --out has no checkpoint yet (one command for "
                                     "the first start and every restart of a preemptible job)"),
    allow_config_change: bool = typer.Option(
        False, "--allow-config-change", help="resume although model, data-order or optimisation settings differ from "
                                             "the checkpoint's (the changes are recorded in the run)"),
    online: bool = typer.Option(False, "--online", help="decode + encode in the loop instead of reading the store (baseline)"),
    num_workers: int = typer.Option(0, help="DataLoader workers reading the store"),
    nproc: int = typer.Option(1, help="processes on this node (launches torchrun); or run under torchrun yourself"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="drop examples whose features are missing / failed"),
    join_key: str = typer.Option("id", help="join instruction records to the store by 'id' or by the video file 'stem'"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    no_export: bool = typer.Option(False, "--no-export", help="skip the safetensors export at the end"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Train connector (+ LLM) from cached features with FSDP; one process, or torchrun for several."""
    from merv.train.trainer import TrainConfig, TrainingStopped, train

    config = TrainConfig(
        data=data, stores=store, recipe=recipe, stage=stage, out_dir=out, encoders=_csv(encoders), projector=projector,
        tokens_per_frame=tokens_per_frame, fusion=fusion, llm=llm, init_from=init_from,
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr, epochs=epochs,
        max_steps=max_steps, max_length=max_length, seed=seed, checkpoint_every=checkpoint_every,
        resume="auto" if resume_auto else resume, allow_config_change=allow_config_change,
        online=online, num_workers=num_workers, allow_missing=allow_missing, join_key=join_key, device=device,
        export=not no_export, progress=not quiet,
    )
    if nproc > 1:
        from merv.train.launch import launch_torchrun

        try:
            code = launch_torchrun(config, nproc)
        except TrainingStopped as exc:
            _fail(str(exc), code=exc.exit_code)
        raise typer.Exit(code)
    try:
        summary = train(config)
    except TrainingStopped as exc:  # SIGTERM / SIGINT: one line, exit status 128 + signal
        _fail(str(exc), code=exc.exit_code)
    console.print(f"run directory: {out} ({summary['steps']} steps; export: {summary.get('export', 'skipped')})")


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Argument(..., help="export directory of `merv train` (run/export)"),
    benchmarks: list[str] = typer.Option(..., "--benchmark", help="eval_data directory (test_q.json, test_a.json); repeatable"),
    store: str = typer.Option(..., "--store", help="feature store holding the benchmark videos (see `merv eval-manifest`)"),
    out: str = typer.Option("runs/eval", "--out"),
    mode: str = typer.Option("generate", help="MCQ answering: generate (greedy + letter extraction) | loglik (option likelihood)"),
    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint for the open-ended LLM judge"),
    judge_model: str = typer.Option("gpt-4o-mini-2024-07-18", help="judge model name"),
    batch_size: int = typer.Option(8),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
) -> None:
    """Evaluate a checkpoint on MCQ / open-ended benchmarks from cached features (shard with torchrun)."""
    from merv.pipelines.evaluate import evaluate
    from merv.pipelines.scoring import JudgeClient

    judge = JudgeClient(judge_url, model=judge_model, api_key=os.environ.get("OPENAI_API_KEY")) if judge_url else None
    result = evaluate(checkpoint, benchmarks, store, out, mode=mode, judge=judge, batch_size=batch_size, device=device)
    if result is None:
        console.print(f"rank done; after all ranks finish run: merv eval-finalize {out}")
        return
    console.print(Path(out, "summary.md").read_text())


@app.command("eval-finalize")
def eval_finalize_cmd(out: str = typer.Argument(..., help="evaluation output directory"),
                      world_size: Optional[int] = typer.Option(None, help="ranks of the sharded run")) -> None:
    """Merge per-rank predictions of a sharded evaluation, score and summarise."""
    from merv.pipelines.evaluate import finalize_results

    finalize_results(out, world_size=world_size)
    console.print(Path(out, "summary.md").read_text())


@app.command("eval-manifest")
def eval_manifest_cmd(benchmark: str = typer.Argument(..., help="eval_data directory"),
                      out: str = typer.Argument(..., help="manifest JSONL to write (input of `merv extract`)"),
                      video_dir: Optional[str] = typer.Option(None, help="where the benchmark's videos are")) -> None:
    """Write the extraction manifest of a benchmark's videos (with their clip windows)."""
    from merv.pipelines.evaluate import write_eval_manifest

    path = write_eval_manifest(benchmark, out, video_dir=video_dir)
    console.print(f"wrote {path}; next: merv extract {path} --store EVAL_STORE")


@app.command("analyze")
def analyze_cmd(
    predictions: str = typer.Argument(..., help="predictions.jsonl or an eval run directory"),
    out: str = typer.Option("runs/plots", "--out"),
    sources: Optional[str] = typer.Option(None, help="manifest JSONL or store, for thumbnails of the top videos"),
    compare: list[str] = typer.Option([], help="LABEL=predictions.jsonl of other models for the skill chart; repeatable"),
) -> None:
    """Fusion-weight distribution, top videos per encoder, accuracy per skill (PNG)."""
    from merv.pipelines.analysis import plot_all

    written = plot_all(predictions, out, sources=sources, compare=_labelled(compare, "--compare") or None)
    for name, path in written.items():
        console.print(f"{name}: {path}")


def _labelled(values: list[str], flag: str) -> dict[str, str]:
    """LABEL=PATH option values as a dict; a value without a label is the user's to fix."""
    pairs = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not (sep and label and path):
            _fail(f"{flag} {value!r}: expected LABEL=PATH, e.g. {flag} baseline=runs/eval/msvd/generate")
        pairs[label] = path
    return pairs


@app.command("generate")
def generate_cmd(
    video: str = typer.Argument(..., help="video or image file (path or fsspec URL)"),
    question: str = typer.Argument(..., help="question about it"),
    checkpoint: str = typer.Option(..., "--checkpoint", help="export directory of `merv train`"),
    size: Optional[str] = typer.Option(None, help="encoder size: paper | small | tiny (default: the checkpoint recipe's)"),
    weights: Optional[str] = typer.Option(None, help="directory with the encoders' weights (else the HF cache, offline)"),
    allow_download: bool = typer.Option(False, "--allow-download", help="let missing encoder weights be fetched from the Hub"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer length limit in tokens (default: the model's)"),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Answer a question about a raw video: online decoding + encoders + the trained model."""
    from merv.pipelines.generate import GenerateOptions, answer_video

    opts = GenerateOptions(size=size, weights=weights, allow_download=allow_download, device=device,
                           max_new_tokens=max_new_tokens)
    print(answer_video(checkpoint, video, question, opts))


@app.command("ablate")
def ablate_cmd(
    sweep: str = typer.Argument(..., help="sweep file (JSON / YAML): base config, axes, benchmarks"),
    out: str = typer.Option("runs/ablate", "--out"),
) -> None:
    """Train + evaluate a grid of configurations from the same cache; resumable; one results table."""
    from merv.pipelines.ablate import Sweep, run_sweep

    rows = run_sweep(Sweep.from_file(sweep), out, progress=True)
    console.print(Path(out, "table.md").read_text())
    console.print(f"{len(rows)} configurations; table: {out}/table.csv")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("runs/demo", "--out", help="output directory"),
    videos: int = typer.Option(200, help="synthetic videos (80% train, 20% held out)"),
    steps: int = typer.Option(300, help="training steps"),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, "--force", help="replace --out even if `merv demo` did not make it"),
) -> None:
    """Synthetic video QA -> extract (tiny encoders, Ray) -> train from cache -> evaluate -> plots."""
    from merv.pipelines.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, videos=videos, steps=steps, seed=seed, force=force), console=console)


@app.command("roundtrip")
def roundtrip_cmd(out: Path = typer.Option(Path("runs/roundtrip"), help="output directory")) -> None:
    """Store health check: write features in every encoding, read back, verify checksums."""
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
    app(prog_name="merv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
