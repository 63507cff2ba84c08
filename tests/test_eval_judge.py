"""The LLM judge after sharded and unsharded evaluations (a stub OpenAI-compatible judge on 127.0.0.1).

  independent ranks (RANK / WORLD_SIZE only): each writes its rank file; `merv eval-finalize OUT`
      merges and judges with the judge recorded in OUT/eval_config.yaml;
  unsharded without a judge: `merv eval-finalize OUT --judge-url URL` adds verdicts later, and
      finalizing again without a judge keeps them;
  torchrun: the ranks meet at a barrier and rank 0 merges, judges and summarises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_evaluate import fill_store, read_rows, write_open_benchmark
from test_scoring import stub_judge
from typer.testing import CliRunner

from merv import cli
from merv.extract.sources import read_manifest
from merv.pipelines import evaluate as E
from merv.train.export import save_merv
from merv.train.model import GenerationOutput, MervModel
from merv.train.tiny import build_tiny_merv

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`

PREDS = ["cooking", "sleeping", "cooking", "gibberish", "cooking"]  # the stub says yes, no, yes, (unparseable), yes


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli._DEBUG, "on", False)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_judge")
    model, _ = build_tiny_merv(seed=0)
    save_merv(model, root / "export", extra={"recipe": "tiny"})
    bench = write_open_benchmark(root / "msvd")
    (root / "videos").mkdir()
    for v in range(5):
        (root / "videos" / f"vid{v}.mp4").write_bytes(b"x")
    fill_store(root / "f.zarr", read_manifest(E.write_eval_manifest(bench, root / "m.jsonl", video_dir=root / "videos")), model)
    return {"root": root, "export": root / "export", "bench": bench, "store": root / "f.zarr"}


@pytest.fixture
def judge_server() -> Iterator[ThreadingHTTPServer]:
    with stub_judge() as server:
        yield server


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation answers PREDS[v] for the question about clip v."""
    def generate(self: MervModel, features: Any, prompt: list[list[int]], **kw: Any) -> GenerationOutput:
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt]
        return GenerationOutput(texts=[PREDS[int(t.split("clip ")[1].split("?")[0])] for t in texts])

    monkeypatch.setattr(MervModel, "generate", generate)


def url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def eval_args(fx: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval", str(fx["export"]), "--benchmark", str(fx["bench"]), "--store", str(fx["store"]), "--out", str(out),
            "--device", "cpu", *extra]


def invoke(args: list[str]) -> str:
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def verdicts(out: Path) -> list[Any]:
    return [r.get("judge_pred") for r in read_rows(out / "msvd" / "generate" / "scored.jsonl")]


def test_independent_ranks_then_finalize_with_the_configured_judge(
    fx: dict[str, Path], scripted: None, judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        text = invoke(eval_args(fx, out, "--judge-url", url(judge_server), "--judge-model", "stub-judge"))
        assert f"merv eval-finalize {out}" in " ".join(text.split())
    assert not judge_server.requests  # type: ignore[attr-defined]  # nobody could judge before every rank finished
    assert sorted(p.name for p in (out / "msvd" / "generate").glob("rank-*")) == [
        "rank-00000-of-00002.jsonl", "rank-00001-of-00002.jsonl"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    text = invoke(["eval-finalize", str(out)])  # the judge of OUT/eval_config.yaml
    assert verdicts(out) == ["yes", "no", "yes", None, "yes"]
    assert {r["body"]["model"] for r in judge_server.requests} == {"stub-judge"}  # type: ignore[attr-defined]
    s = json.loads((out / "summary.json").read_text())["benchmarks"]["msvd"]["generate"]
    assert s["metric"] == "judge" and s["accuracy"] == pytest.approx(3 / 4) and s["judge"]["failed"] == 1
    assert "| msvd | generate | judge | 5 |" in text


def test_judge_added_after_an_unjudged_run(
    fx: dict[str, Path], scripted: None, judge_server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    invoke(eval_args(fx, out))
    assert verdicts(out) == [None] * 5
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["msvd"]["generate"]["metric"] == "match"
    invoke(["eval-finalize", str(out), "--judge-url", url(judge_server)])
    assert verdicts(out) == ["yes", "no", "yes", None, "yes"]
    asked = len(judge_server.requests)  # type: ignore[attr-defined]
    invoke(["eval-finalize", str(out)])  # no judge now: earlier verdicts stay, only the unparsed one is lost to "match"
    assert verdicts(out) == ["yes", "no", "yes", None, "yes"] and len(judge_server.requests) == asked  # type: ignore[attr-defined]
    res = CliRunner().invoke(cli.app, ["eval-finalize", str(out), "--judge-model", "m"])
    assert res.exit_code == 2 and "without a judge url: pass --judge-url URL" in res.output


def test_torchrun_rank0_merges_and_judges(fx: dict[str, Path], judge_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "merv.cli",
           *eval_args(fx, out, "--judge-url", url(judge_server), "--judge-model", "stub-judge", "--max-new-tokens", "3")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| msvd | generate | judge | 5 |" in run.stdout  # rank 0 printed the judged summary
    assert "rank done" in run.stdout  # rank 1 returned without judging
    rows = read_rows(out / "msvd" / "generate" / "scored.jsonl")
    assert len(rows) == 5 and all(r["judge_model"] == "stub-judge" for r in rows)
    assert len(judge_server.requests) == 5  # type: ignore[attr-defined]  # judged once, by rank 0
