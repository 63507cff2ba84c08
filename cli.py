"""The `merv` command line: parse arguments, call the library, print results. Nothing else.

Errors caused by the user's input (every `merv.MervError`, and the common library errors a bad
path or file produces) are printed as one line naming the input and the fix, exit status 2; a
traceback is shown only for genuine bugs, or for every error with `merv --debug` / MERV_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
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


# Plain (click-style) help: flags read as flags (`--resume`, not `--resume <bool>`), and the text
# stays greppable in any terminal; `merv --install-completion` sets up shell completion.
_HELP = {"rich_markup_mode": None, "no_args_is_help": True}
app = _App(add_completion=True, help="MERV video LLMs with cached frozen-encoder features.", **_HELP)
store_app = _App(help="Inspect and check feature stores.", **_HELP)
app.add_typer(store_app, name="store")
model_app = _App(help="Model recipes: sizes and FLOPs.", **_HELP)
app.add_typer(model_app, name="model")


# One spelling per shared option, every command.
DEVICE_HELP = "auto (a GPU when there is one, else the CPU) | cpu | cuda | cuda:N"
QUIET_HELP = "no progress bar"
LIST_HELP = "repeatable, or comma-separated"  # free-text values (--set, --stop) are repeatable only


def _print_version(value: bool) -> None:
    if value:
        from merv import __version__

        print(f"merv {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of every error (also MERV_DEBUG=1)"),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print merv's version and exit"),
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
        codecs = "; ".join(f"{name}: {chain}" for name, chain in g["codecs"].items())
        console.print(f"{g['key']}: fingerprint {g['fingerprint']}, {g['bytes_on_disk'] / 2**20:.2f} MiB on disk, "
                      f"codecs {codecs}")


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
    store: Optional[str] = typer.Option(None, "--store", help="output feature store (path or fsspec URL)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML / JSON file of extraction options (keys as in --print-config)"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE override of any option, e.g. --set batch_size=16; repeatable"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved options as YAML and exit"),
    encoders: list[str] = typer.Option([], "--encoders", help=f"encoder names (default: the paper's four), hiera, or specs timm:<arch>.<tag> / hf:<repo|dir> with ?layer=N&frames=N; {LIST_HELP}"),
    weights: Optional[str] = typer.Option(None, help="directory with the encoders' weights (else the HF cache, offline); 'random': random init (benchmarks)"),
    grid: Optional[str] = typer.Option(None, help="cache pooled to HxW (default 8x8: least I/O) or 'native' (every token-count ablation)"),
    encoding: Optional[str] = typer.Option(None, help="fp16 (default) | bitround | int8"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join this Ray cluster (else RAY_ADDRESS, else embedded)"),
    size: Optional[str] = typer.Option(None, help="'paper' (default: published weights), or random-init 'small' (benchmarks) / 'tiny' (tests, demo)"),
    workers: Optional[int] = typer.Option(None, help="encoder actors (default: one per GPU, else 1)"),
    batch_size: Optional[int] = typer.Option(None, help="clips per encoder forward, across videos (default 8)"),
    inflight: Optional[int] = typer.Option(None, help="shards open per encoder actor (default 2; bounds the actors' feature buffers)"),
    max_inflight_bytes: Optional[str] = typer.Option(
        None, help="decoded frames alive at once, e.g. 4GiB or 500MB (default: a quarter of Ray's object store)"),
    stop_grace: Optional[float] = typer.Option(None, help="seconds shards may finish after SIGINT / SIGTERM before they are abandoned (default 60)"),
    decode_cpus: Optional[float] = typer.Option(None, help="CPUs per decode task (default 1)"),
    worker_cpus: Optional[float] = typer.Option(None, help="CPUs reserved per actor (default 1 with GPUs, 0 on CPU-only)"),
    torch_threads: Optional[int] = typer.Option(None, help="torch threads per actor (default: the CPUs it may use)"),
    device: Optional[str] = typer.Option(None, "--device", help=f"encoder device: {DEVICE_HELP}"),
    decoder: Optional[str] = typer.Option(None, help="video decoder: auto (PyAV, the fastest measured) | pyav | "
                                                     "decord | torchcodec; all give identical frames"),
    resize_at: Optional[str] = typer.Option(None, "--resize-at", help="decode (default: decode tasks ship each encoder's "
                                            "resized pixels) | encoder (ship full frames; resize on the encoder's device)"),
    codec: Optional[str] = typer.Option(None, help="codec chain of new encoder groups: none | zstd-<level> | "
                                        "blosc-<cname>-<level>-<shuffle> (default: the encoding's measured choice)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="redo shards that hold recorded failures"),
    samples_per_shard: Optional[int] = typer.Option(None, help="samples per shard of a new store (else ~128 MiB shards)"),
    allow_download: bool = typer.Option(False, "--allow-download", help="let missing weights be fetched from the Hub"),
    storage_options: Optional[str] = typer.Option(
        None, help='fsspec options (JSON) for URL sources, videos and the store, e.g. \'{"endpoint_url": "http://..."}\'; '
                   "AWS_* / GOOGLE_* environment variables work too"),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON document on stdout (logs go to stderr)"),
) -> None:
    """Decode every video once, run each frozen encoder once, write the feature store.

    Options come from the defaults, then --config FILE, then the flags, then --set (each flag is
    one key of the file; `--print-config` shows them all). A re-run skips committed shards. Exit
    status 1 when a shard could not be written; after SIGINT / SIGTERM, 128 + the signal number
    (committed shards are kept: re-run to continue).
    """
    from rich.markup import escape

    from merv.extract.job import load_extract_options, run_extraction
    from merv.train.configurable import dump_config

    flags = {"source": source, "store": store, "encoders": _listed(encoders), "weights": weights, "grid": grid,
             "encoding": encoding, "ray_address": ray_address, "size": size, "workers": workers,
             "batch_size": batch_size, "inflight_per_worker": inflight, "max_inflight_bytes": max_inflight_bytes,
             "stop_grace_s": stop_grace, "decode_cpus": decode_cpus, "worker_cpus": worker_cpus,
             "torch_threads": torch_threads, "device": device, "decoder": decoder, "resize_at": resize_at,
             "codec": codec, "samples_per_shard": samples_per_shard,
             "retry_failed": retry_failed or None, "allow_download": allow_download or None,
             "storage_options": _json_option(storage_options, "--storage-options")}
    opts = load_extract_options(str(config) if config else None, overrides,
                                {k: v for k, v in flags.items() if v is not None})
    if print_config:
        print(dump_config(opts), end="")
        return
    if not opts.store:
        _fail("no feature store to write: pass --store PATH (or `store:` in the --config file)")
    out = _json_stdout() if as_json else None
    summary = run_extraction(opts.source, opts.store, opts, console=Console(stderr=True), show_progress=not quiet)
    if out is not None:
        out.write(json.dumps(summary.to_json(), indent=2, default=str) + "\n")
        out.flush()
    else:
        for note in summary.notes:
            err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        for sid, reason in list(summary.failed.items())[:20]:
            console.print(f"[yellow]failed[/] {escape(sid)}: {escape(reason)}", highlight=False, soft_wrap=True)
        if len(summary.failed) > 20:
            console.print(f"... and {len(summary.failed) - 20} more failures (see `merv store info {opts.store}`)",
                          highlight=False, markup=False)
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
    recipe: str = typer.Argument("merv-frozen", help="recipe name (merv-frozen, merv-full, dinov2-single, "
                                                     "qwen2.5-7b-instruct, llama3-8b-instruct, ...)"),
    seq_len: Optional[int] = typer.Option(None, help="LLM sequence length for FLOPs (default: the recipe's max length)"),
    encoders: list[str] = typer.Option([], "--encoders", help=f"replace the recipe's encoders (names, hiera, timm:... / hf:... specs; measured on the meta device); {LIST_HELP}"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON document"),
    lora: Optional[str] = typer.Option(
        None, "--lora", help="also the training memory, full finetune vs LoRA: r=16[,alpha=32,target_modules=q_proj+v_proj]"),
) -> None:
    """Parameters per component and analytic FLOPs per sample, from a meta-device build (no weights)."""
    from merv.pipelines.model_info import model_info

    report = model_info(recipe, seq_len, _listed(encoders)).to_dict()
    memory = _memory_rows(recipe, lora) if lora is not None else None
    if as_json:
        print(json.dumps({**report, "memory": memory} if memory is not None else report, indent=2))
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
    if memory is not None:
        gib = 2.0**30
        table = Table("training", "params (M)", "trainable (M)", "weights GiB", "grads GiB", "AdamW m+v GiB",
                      "total GiB")
        for row in memory:
            table.add_row(row["setup"], f"{row['params'] / 1e6:,.1f}", f"{row['trainable'] / 1e6:,.2f}",
                          f"{row['weight_bytes'] / gib:,.2f}", f"{row['grad_bytes'] / gib:,.2f}",
                          f"{row['optimizer_bytes'] / gib:,.2f}", f"{row['total_bytes'] / gib:,.2f}")
        console.print(table)
        console.print("whole model, before FSDP divides it over ranks; activations not included. The trainer keeps "
                      "fp32 weights (the master copy; bf16 compute copies are per layer and transient), gradients "
                      "and AdamW state for the trainable parameters only.")


def _memory_rows(recipe: str, spec: str) -> list[dict[str, Any]]:
    from merv.train.lora import parse_lora_spec
    from merv.train.recipes import recipe_memory

    config = parse_lora_spec(spec)
    if not config.enabled:
        _fail(f"--lora {spec!r}: give the adapter rank, e.g. --lora r=16")
    return [row.to_dict() for row in recipe_memory(recipe, config)]


def _json_option(value: Optional[str], flag: str) -> Any:
    """A flag whose value is a JSON object (None when not given)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        _fail(f"{flag} {value!r} is not JSON ({exc.msg}); pass an object such as '{{\"key\": \"value\"}}'")
    if not isinstance(parsed, dict):
        _fail(f"{flag} {value!r}: expected a JSON object of options")
    return parsed


def _listed(values: Optional[list[str]]) -> Optional[list[str]]:
    """A list option's values: repeated flags and comma-separated values both count; None when not given."""
    items = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return items or None


@app.command("train")
def train_cmd(
    config_file: Optional[str] = typer.Option(
        None, "--config", help="YAML / JSON run config, e.g. a run's config.yaml (reruns it); keys as in --print-config"),
    overrides: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE of any config key, e.g. --set optim.lr=2e-5 --set model.connector.fusion=concat_channel; "
                          "repeatable, applied last"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit"),
    recipe: Optional[str] = typer.Option(
        None, help="starting point: tiny (unless --config names one) | merv-frozen | merv-full | <encoder>-single | ..."),
    stage: Optional[str] = typer.Option(None, help="stage of the recipe: align | finetune | full-align (default: its last)"),
    data: list[str] = typer.Option([], "--data", help=f"instruction data (LLaVA / Video-LLaVA JSON or JSONL); {LIST_HELP}"),
    stores: list[str] = typer.Option([], "--store", help=f"feature store for the data (one, or one per --data); {LIST_HELP}"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="run directory (config.yaml, metrics, checkpoints, export)"),
    encoders: list[str] = typer.Option([], "--encoders", help=f"encoder subset, e.g. dinov2,siglip,vivit (no re-extraction); {LIST_HELP}"),
    projector: Optional[str] = typer.Option(None, help="avg2d | avg3d | conv2d | conv3d | attentive | all_tokens | cls"),
    tokens_per_frame: Optional[int] = typer.Option(None, help="square token count per frame: 1, 4, 16, 64, 100, 144, 256"),
    fusion: Optional[str] = typer.Option(None, help="cross_attention | cross_attention_plain | concat_sequence | concat_channel | learnable_scalar | fixed_mix"),
    llm: Optional[str] = typer.Option(None, help="the LLM: registry id or local HF directory"),
    init_from: Optional[str] = typer.Option(None, help="start from a previous stage's export directory"),
    global_batch_size: Optional[int] = typer.Option(None, help="samples per optimizer step"),
    micro_batch_size: Optional[int] = typer.Option(None, help="samples per forward per rank (gradient accumulation fills the rest)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate"),
    epochs: Optional[int] = typer.Option(None, help="passes over the data (ignored when --max-steps is given)"),
    max_steps: Optional[int] = typer.Option(None, help="train exactly this many optimizer steps (instead of epochs)"),
    max_length: Optional[int] = typer.Option(None, help="truncate conversations to this many tokens"),
    seed: Optional[int] = typer.Option(None, help="seed of the initialisation and of the data order"),
    checkpoint_every: Optional[int] = typer.Option(None, help="checkpoint every N steps (always at the end)"),
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
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers reading the store"),
    nproc: Optional[int] = typer.Option(None, help="processes on this node (launches torchrun); or run under torchrun yourself"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="drop examples whose features are missing / failed"),
    join_key: Optional[str] = typer.Option(None, help="join instruction records to the store by 'id' or by the video file 'stem'"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    no_export: bool = typer.Option(False, "--no-export", help="skip the safetensors export at the end"),
    wandb: Optional[str] = typer.Option(
        None, "--wandb", help="also log to Weights & Biases: online | offline (logging.wandb.mode; project etc.: "
                              "--set logging.wandb.project=...)"),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run's summary as one JSON document on stdout"),
) -> None:
    """Train connector (+ LLM) from cached features with FSDP; one process, or torchrun for several.

    The run's config is the recipe, then --config FILE, then the flags (each is one config key:
    see --print-config), then --set; it is written to the run directory as config.yaml.
    """
    from merv.train.configurable import dump_config
    from merv.train.recipes import load_run_config
    from merv.train.trainer import TrainingStopped, train

    flags = {"recipe": recipe, "stage": stage, "data": _listed(data), "stores": _listed(stores), "out_dir": out_dir,
             "encoders": _listed(encoders), "projector": projector, "tokens_per_frame": tokens_per_frame, "fusion": fusion,
             "llm": llm, "init_from": init_from, "global_batch_size": global_batch_size,
             "micro_batch_size": micro_batch_size, "lr": lr, "epochs": epochs, "max_steps": max_steps,
             "max_length": max_length, "seed": seed, "checkpoint_every": checkpoint_every,
             "resume": "auto" if resume_auto else (True if resume else None),
             "allow_config_change": allow_config_change or None, "online": online or None, "num_workers": num_workers,
             "nproc": nproc, "allow_missing": allow_missing or None, "join_key": join_key, "device": device,
             "export": False if no_export else None, "progress": False if quiet else None, "wandb": wandb}
    config = load_run_config(file=config_file, flags={k: v for k, v in flags.items() if v is not None},
                             overrides=overrides)
    if print_config:
        print(dump_config(config), end="")
        return
    try:
        if config.parallel.nproc > 1:
            from merv.train.launch import launch_torchrun

            raise typer.Exit(launch_torchrun(config))
        summary = train(config)
    except TrainingStopped as exc:  # SIGTERM / SIGINT: one line, exit status 128 + signal
        _fail(str(exc), code=exc.exit_code)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    console.print(f"run directory: {config.checkpoint.out_dir} ({summary['steps']} steps; "
                  f"export: {summary.get('export', 'skipped')})")


@app.command("eval")
def eval_cmd(
    checkpoint: Optional[str] = typer.Argument(None, help="export directory of `merv train` (run/export); key: checkpoint"),
    config: Optional[str] = typer.Option(None, "--config", help="eval config file (YAML or JSON); see --print-config"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE for any config key, dotted (judge.url=...); repeatable"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config (YAML) and exit"),
    benchmarks: list[str] = typer.Option([], "--benchmark", help=f"eval_data directory (test_q.json, test_a.json); {LIST_HELP}; key: benchmarks"),
    store: Optional[str] = typer.Option(None, "--store", help="feature store holding the benchmark clips (see `merv eval-manifest`); key: store"),
    out: Optional[str] = typer.Option(None, "--out", help="results directory; key: out"),
    mode: Optional[str] = typer.Option(None, "--mode", help="MCQ answering: generate (greedy + letter extraction) | loglik (option likelihood); key: mode"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of the open-ended LLM judge; key: judge.url"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge model name; key: judge.model"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="questions per forward; key: batch_size"),
    device: Optional[str] = typer.Option(None, "--device", help=f"{DEVICE_HELP}; key: device"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="answer length limit; key: max_new_tokens"),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON document on stdout"),
) -> None:
    """Evaluate a checkpoint on MCQ / open-ended benchmarks from cached features (shard with torchrun).

    Settings: defaults, then --config, then the shorthand flags below, then --set. The resolved config is
    written to OUT/eval_config.yaml; the judge's API key comes from $OPENAI_API_KEY (judge.api_key_env).
    """
    from merv.pipelines.evaluate import load_eval_config, run_eval
    from merv.train.configurable import dump_config

    cfg = load_eval_config(config, overrides, {
        "checkpoint": checkpoint, "benchmarks": _listed(benchmarks), "store": store, "out": out, "mode": mode,
        "judge.url": judge_url, "judge.model": judge_model, "batch_size": batch_size, "device": device,
        "max_new_tokens": max_new_tokens,
    })
    if print_config:
        print(dump_config(cfg), end="")
        return
    with _progress_bars("questions", enabled=not quiet) as progress:
        result = run_eval(cfg, progress=progress)
    if result is None:
        console.print(f"rank done; after all ranks finish run: merv eval-finalize {cfg.out}")
    elif as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        console.print(Path(cfg.out, "summary.md").read_text())


@app.command("eval-finalize")
def eval_finalize_cmd(
    out: str = typer.Argument(..., help="evaluation output directory (--out of `merv eval`)"),
    world_size: Optional[int] = typer.Option(None, help="merge only the rank files of this many ranks"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="judge open-ended answers here (default: OUT/eval_config.yaml's judge.url)"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge model name (default: OUT/eval_config.yaml's)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON document on stdout"),
) -> None:
    """Merge the rank files of an evaluation, score (LLM judge optional, resumable) and summarise."""
    from merv.pipelines.evaluate import finalize_eval

    result = finalize_eval(out, world_size=world_size, judge={"url": judge_url, "model": judge_model})
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        console.print(Path(out, "summary.md").read_text())


@app.command("eval-manifest")
def eval_manifest_cmd(benchmark: str = typer.Argument(..., help="eval_data directory"),
                      out: str = typer.Argument(..., help="manifest JSONL to write (input of `merv extract`)"),
                      video_dir: Optional[str] = typer.Option(None, help="where the benchmark's videos are"),
                      id_prefix: str = typer.Option("", help="prefix of every sample id (pass the same as eval's id_prefix)")) -> None:
    """Write the extraction manifest of a benchmark's clips; ids name video + window (video@ef595)."""
    from merv.pipelines.evaluate import write_eval_manifest

    path = write_eval_manifest(benchmark, out, video_dir=video_dir, id_prefix=id_prefix)
    console.print(f"wrote {path}; next: merv extract {path} --store EVAL_STORE")


@app.command("analyze")
def analyze_cmd(
    predictions: str = typer.Argument(..., help="predictions.jsonl or an eval run directory"),
    out: str = typer.Option("runs/plots", "--out", help="directory for the PNG charts"),
    sources: Optional[str] = typer.Option(None, help="manifest JSONL or store, for thumbnails of the top videos"),
    compare: list[str] = typer.Option([], "--compare", help=f"LABEL=predictions.jsonl of other models for the skill chart; {LIST_HELP}"),
) -> None:
    """Fusion-weight distribution, top videos per encoder, accuracy per skill (PNG)."""
    from merv.pipelines.analysis import plot_all

    written = plot_all(predictions, out, sources=sources, compare=_labelled(_listed(compare) or [], "--compare") or None)
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
    checkpoint: str = typer.Option(..., "--checkpoint", help="export directory of `merv train`, or a published model: "
                                   "merv-full | merv-frozen | <encoder>-single (HF cache; --allow-download fetches it)"),
    size: Optional[str] = typer.Option(None, help="encoder size: paper | small | tiny (default: the checkpoint recipe's)"),
    weights: Optional[str] = typer.Option(None, help="directory with the encoders' weights (else the HF cache, offline)"),
    allow_download: bool = typer.Option(False, "--allow-download", help="let missing encoder / published model weights be fetched from the Hub"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer length limit in tokens (default 64)"),
    temperature: float = typer.Option(0.0, help="0: greedy (default); > 0: sample at this temperature"),
    top_p: float = typer.Option(1.0, help="nucleus sampling: keep the most likely tokens up to this probability"),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeated tokens"),
    stop: list[str] = typer.Option([], "--stop", help="stop when the answer produces this text; repeatable"),
    seed: int = typer.Option(0, help="seed of the sampling (a sampled answer repeats with the same seed)"),
    stream: bool = typer.Option(False, "--stream", help="print the answer as it is generated"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Answer a question about a raw video: online decoding + encoders + the trained model."""
    from merv.pipelines.generate import GenerateOptions, answer_video

    limit = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    opts = GenerateOptions(size=size, weights=weights, allow_download=allow_download, device=device,
                           temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                           stop=tuple(stop), seed=seed, **limit)
    if not stream:
        print(answer_video(checkpoint, video, question, opts))
        return
    answer_video(checkpoint, video, question, opts, on_text=lambda piece: print(piece, end="", flush=True))
    print()


@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Argument(..., help="export directory of `merv train`, or a published model (merv-full, ...)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default; 0.0.0.0 opens it to the network)"),
    port: int = typer.Option(8000, help="port to listen on"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients send (default: the run's directory name)"),
    api_key: Optional[str] = typer.Option(None, envvar="MERV_API_KEY",
                                          help="require `Authorization: Bearer KEY` (also $MERV_API_KEY)"),
    max_upload_mb: float = typer.Option(200.0, help="largest video / image a request may carry, in MiB"),
    max_video_seconds: float = typer.Option(3600.0, help="longest video a request may carry"),
    max_tokens: int = typer.Option(1024, help="the most tokens a request may ask to generate"),
    batch_window_ms: float = typer.Option(10.0, help="how long the engine waits to batch concurrent requests"),
    no_local_files: bool = typer.Option(False, "--no-local-files",
                                        help="refuse paths on the server in video_url / image_url (base64 only)"),
    size: Optional[str] = typer.Option(None, help="encoder size: paper | small | tiny (default: the checkpoint recipe's)"),
    weights: Optional[str] = typer.Option(None, help="directory with the encoders' weights (else the HF cache, offline)"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Serve a model over the OpenAI chat-completions API (images and videos in the messages)."""
    from merv.pipelines.generate import GenerateOptions
    from merv.serve import ServeConfig, serve

    config = ServeConfig(host=host, port=port, model_name=model_name, api_key=api_key,
                         max_upload_bytes=int(max_upload_mb * 2**20), max_video_seconds=max_video_seconds,
                         max_tokens=max_tokens, allow_local_files=not no_local_files, batch_window_ms=batch_window_ms)
    serve(checkpoint, config, GenerateOptions(size=size, weights=weights, device=device))


@app.command("convert")
def convert_cmd(
    source: str = typer.Argument(..., help="an export in the earlier layout (merv_config.json, connector.safetensors, llm/)"),
    out: str = typer.Argument(..., help="new directory for the Hugging Face-native export"),
) -> None:
    """Rewrite an earlier-layout export as a Hugging Face-native model directory (weights unchanged)."""
    from merv.train.export import convert_export

    console.print(f"wrote {convert_export(source, out)}")


@app.command("convert-reference")
def convert_reference_cmd(
    source: str = typer.Argument(..., help="published checkpoint name (merv-frozen, merv-full, ...: from the HF "
                                           "cache, offline) or a reference run directory"),
    out: str = typer.Argument(..., help="new directory for the Hugging Face-native export"),
    tokenizer: str = typer.Option("llama2-7b-pure", help="the LLM's tokenizer: registry id or local directory"),
    dtype: str = typer.Option("bfloat16", help="weight dtype of the export: bfloat16 | float16 | float32"),
    llm_config: Optional[Path] = typer.Option(None, help="the LLM's config.json when it is not LLaMA-2 7B"),
) -> None:
    """Convert the published MERV weights (reference layout) into a Hugging Face-native export."""
    import torch
    from transformers import AutoConfig

    from merv.train.export import convert_reference

    if dtype not in ("bfloat16", "float16", "float32"):
        _fail(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    if llm_config is not None and (llm_config.name != "config.json" or not llm_config.is_file()):
        _fail(f"--llm-config {llm_config}: pass an existing config.json of the LLM")
    cfg = AutoConfig.from_pretrained(str(llm_config.parent), local_files_only=True) if llm_config else None
    path = convert_reference(source, out, tokenizer_source=tokenizer, dtype=getattr(torch, dtype), llm_config=cfg)
    console.print(f"wrote {path}")


@app.command("ablate")
def ablate_cmd(
    sweep: str = typer.Argument(..., help="sweep file (JSON / YAML): base config, variants / axes of dotted "
                                          "overrides, benchmarks"),
    out: str = typer.Option("runs/ablate", "--out", help="sweep directory (one run per variant, results table)"),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
) -> None:
    """Train + evaluate a grid of configurations from the same cache; resumable; one results table."""
    from rich.markup import escape

    from merv.pipelines.ablate import Sweep, run_sweep

    plan = Sweep.from_file(sweep)
    for note in plan.notes:
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    rows = run_sweep(plan, out, progress=not quiet)
    console.print(Path(out, "table.md").read_text())
    console.print(f"{len(rows)} configurations; table: {out}/table.csv")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("runs/demo", "--out", help="output directory"),
    videos: Optional[int] = typer.Option(None, help="synthetic videos (80% train, 20% held out) [default: DemoConfig's]"),
    steps: Optional[int] = typer.Option(None, help="training steps per model [default: DemoConfig's]"),
    seed: int = typer.Option(0, help="seed of the synthetic data and of training"),
    baselines: bool = typer.Option(True, help="also train the other fusion and the single-encoder baselines, and "
                                              "price the cache against online encoding"),
    force: bool = typer.Option(False, "--force", help="replace --out even if `merv demo` did not make it"),
) -> None:
    """Synthetic video QA -> extract once (tiny encoders, Ray) -> train MERV and baselines from the cache ->
    accuracy per model and skill, fusion weights, cache-vs-online cost -> plots."""
    from merv.pipelines.demo import DemoConfig, run_demo

    given = {k: v for k, v in (("videos", videos), ("steps", steps)) if v is not None}
    if not baselines:
        given.update(singles=(), fusion=None, online_steps=0)
    run_demo(DemoConfig(out=out, seed=seed, force=force, **given), console=console)


@app.command("roundtrip")
def roundtrip_cmd(out: Path = typer.Option(Path("runs/roundtrip"), "--out", help="output directory")) -> None:
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


@contextlib.contextmanager
def _progress_bars(unit: str, enabled: bool = True) -> Iterator[Optional[Callable[[int, int], None]]]:
    """A `progress(done, total)` callback drawing one tqdm bar per job (a new bar when a count restarts)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar: dict[str, Any] = {"bar": None}

    def update(done: int, total: int) -> None:
        current = bar["bar"]
        if current is None or current.total != total or done < current.n:
            if current is not None:
                current.close()
            current = bar["bar"] = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)
        current.update(done - current.n)

    try:
        yield update
    finally:
        if bar["bar"] is not None:
            bar["bar"].close()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="merv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
