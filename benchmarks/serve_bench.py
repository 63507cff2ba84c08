"""Server benchmark: `merv serve` under 1, 4 and 16 concurrent clients. Prints one JSON object.

A real `merv serve` process on 127.0.0.1 and the official `openai` client in threads, each client
sending its next request as soon as the last one is answered (closed loop). Every request asks about
one of a few generated clips (a path on the server) with the same settings, so concurrent requests
can share one batched `generate`. Reported per concurrency: requests/s over the whole run, p50 /
p95 latency, and requests per second relative to one client (what batching buys). On a CPU the
clients and the server share the cores; the numbers compare settings on one machine.

    python -m merv.benchmarks.serve_bench                        # tiny model, CPU
    python -m merv.benchmarks.serve_bench --export runs/x/export --device cuda --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from merv.benchmarks.extract_bench import write_clips
from merv.serve.app import ServeConfig
from merv.serve.process import serve_process

KEY = "sk-bench"
TINY_ENCODERS = ("dinov2", "vivit")


def tiny_export(directory: Path) -> Path:
    """A tiny model over two tiny real encoders, exported as `merv train` does (random weights)."""
    from merv.extract.encoders import build_encoder
    from merv.train.connector import ConnectorConfig
    from merv.train.export import save_merv
    from merv.train.specs import FeatureSpec
    from merv.train.tiny import build_tiny_merv

    specs = [FeatureSpec(n, tuple(build_encoder(n, size="tiny").info.grid), build_encoder(n, size="tiny").info.dim)
             for n in TINY_ENCODERS]
    model, _ = build_tiny_merv(specs=specs, connector_config=ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48))
    out = directory / "tiny" / "export"
    save_merv(model, out, extra={"recipe": "tiny", "encoder_size": "tiny"})
    return out


def run_clients(base_url: str, clips: list[Path], clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` requests from `clients` closed-loop clients; latencies in seconds."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=600)
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def one_client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What happens in this video?"},
                                             {"type": "video_url", "video_url": {"url": str(clips[i % len(clips)])}}]}])
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": requests, "requests_per_s": round(requests / wall, 3),
            "p50_latency_s": round(statistics.median(latencies), 3),
            "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", default=None, help="a merv export (default: a tiny random one)")
    ap.add_argument("--device", default=None, help="the server's device (default: its own choice)")
    ap.add_argument("--clients", default="1,4,16", help="comma list of concurrent clients")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=ServeConfig.batch_window_ms)
    ap.add_argument("--clip-hw", default="240x320", help="height x width of the generated clips")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="merv-serve-bench-"))
    try:
        export = Path(args.export) if args.export else tiny_export(work)
        h, w = (int(v) for v in args.clip_hw.lower().split("x"))
        clips = write_clips(work, 4, 32, (h, w))
        serve_args = ["--api-key", KEY, "--model-name", "bench", "--batch-window-ms", str(args.batch_window_ms),
                      *(["--device", args.device] if args.device else [])]
        with serve_process(export, serve_args, timeout_s=600) as server:
            run_clients(server.api, clips, 1, 2, args.max_tokens)  # warm-up: the LLM loads on first use
            levels = [run_clients(server.api, clips, int(c), args.requests, args.max_tokens)
                      for c in args.clients.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single = levels[0]["requests_per_s"]
    for level in levels:
        level["speedup_over_first"] = round(level["requests_per_s"] / single, 3)
    report = {
        "benchmark": "serve",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"export": args.export or "tiny (random weights, encoders dinov2 + vivit tiny)",
                     "device": args.device, "max_tokens": args.max_tokens, "clip": f"{w}x{h}, 32 frames",
                     "batch_window_ms": args.batch_window_ms},
        "results": levels,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
