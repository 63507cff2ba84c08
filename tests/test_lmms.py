"""lmms-eval's own entry point with `--model merv` on a tiny export: a local task (YAML + JSON +
generated videos), generation and multiple choice, from the videos and from a feature store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import llm as H
from testkit import media as M
from testkit.extraction import extract_in_process
from testkit.threads import one_thread  # noqa: F401  (module fixture: torch on one thread)

pytestmark = pytest.mark.integration  # lmms-eval in subprocesses

pytest.importorskip("lmms_eval")
ENCODERS = ("dinov2", "vivit")
QUESTIONS = ["What is shown?", "Which way does it move?", "What colour is it?"]

UTILS = '''
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [os.path.join(HERE, doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["options"]


def doc_to_target(doc):
    return doc["options"].index(doc["answer"])


def doc_to_answer(doc):
    return doc["answer"]
'''

GEN_TASK = '''
task: merv_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
'''

MC_TASK = '''
task: merv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny export over two tiny real encoders, a task directory with three generated videos, and
    a store extracted from those videos (native grids, as the export expects)."""
    from merv.extract.encoders import build_encoder
    from merv.extract.job import ExtractOptions
    from merv.train.connector import ConnectorConfig
    from merv.train.export import save_merv
    from merv.train.specs import FeatureSpec

    root = tmp_path_factory.mktemp("lmms")
    specs = [FeatureSpec(n, tuple(build_encoder(n, size="tiny").info.grid), build_encoder(n, size="tiny").info.dim)
             for n in ENCODERS]
    model, _ = H.build_tiny_merv(specs=specs, connector_config=ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48),
                                 seed=3)
    export = root / "export"
    save_merv(model, export, extra={"recipe": "tiny", "encoder_size": "tiny"})
    tasks = root / "tasks"
    tasks.mkdir()
    rows = []
    for i, question in enumerate(QUESTIONS):
        video = M.write_video(tasks / f"clip{i}.mp4", n_frames=12 + 4 * i, size=(48, 64), noise=4 + i)
        rows.append({"id": f"clip{i}", "video": video.name, "question": question,
                     "options": ["red", "green", "blue"], "answer": ["red", "green", "blue"][i]})
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "merv_tiny_gen.yaml").write_text(GEN_TASK)
    (tasks / "merv_tiny_mc.yaml").write_text(MC_TASK)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "path": str(tasks / r["video"])}) + "\n" for r in rows))
    store = root / "features.zarr"
    assert extract_in_process(manifest, store, ExtractOptions(encoders=list(ENCODERS), size="tiny", grid="native")) == 3
    return {"export": export, "tasks": tasks, "store": store, "root": root}


def _lmms_eval_argv(setup: dict[str, Path], out: Path, model_args: str, tasks: str, model: str = "merv") -> list[str]:
    """An lmms-eval command line as a user types it (after `python -m lmms_eval`)."""
    return ["--model", model, "--model_args", model_args, "--tasks", tasks, "--include_path", str(setup["tasks"]),
            "--output_path", str(out), "--batch_size", "2", "--log_samples",
            "--verbosity", "DEBUG"]  # DEBUG: lmms-eval re-raises a failure (exit 1) instead of logging it and exiting 0


@pytest.fixture(scope="module")
def lmms_runs(setup, server) -> dict[str, dict]:
    """The module's three lmms-eval command lines, each through lmms-eval's own entry point, in one
    process (testkit/lmms_runs.py: lmms-eval's imports cost seconds per process), offline:
      videos  --model merv on the export, visuals decoded from the videos
      store   the same with store=, the videos moved away for that run
      openai  lmms-eval's OpenAI-compatible model against `merv serve` (videos passed by path)
    By name: {"status", "log", "results", "samples" (by task and doc id)}."""
    from testkit import lmms_runs as driver

    root = setup["root"] / "lmms_runs"
    hidden = root / "hidden"
    hidden.mkdir(parents=True)
    both = "merv_tiny_gen,merv_tiny_mc"
    openai = f"model_version=merv-tiny,base_url={server},api_key=sk-lmms,pass_video_url=true,max_retries=1"
    runs = {
        "videos": (_lmms_eval_argv(setup, root / "videos", f"pretrained={setup['export']}", both), []),
        "store": (_lmms_eval_argv(setup, root / "store", f"pretrained={setup['export']},store={setup['store']}", both),
                  [[str(setup["tasks"] / f"clip{i}.mp4"), str(hidden / f"clip{i}.mp4")] for i in range(len(QUESTIONS))]),
        "openai": (_lmms_eval_argv(setup, root / "openai", openai, "merv_tiny_gen", model="openai"), []),
    }
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": [{"name": n, "argv": argv, "hide": hide} for n, (argv, hide) in runs.items()]}))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, driver.__file__, str(spec)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900, check=False)
    found = {}
    for name, (argv, _hide) in runs.items():
        section = proc.stdout.split(driver.START.format(name=name) + "\n", 1)[-1]
        log, _, tail = section.partition(driver.END.format(name=name, status=""))
        out = Path(argv[argv.index("--output_path") + 1])
        tasks = argv[argv.index("--tasks") + 1]
        results = list(out.rglob("*_results.json"))
        samples = {t: {row["doc_id"]: row for row in map(json.loads, p.read_text().splitlines())}
                   for t in tasks.split(",") for p in out.rglob(f"*_samples_{t}.jsonl")}
        found[name] = {"status": tail.split("\n", 1)[0], "log": log, "samples": samples,
                       "results": json.loads(results[0].read_text()) if len(results) == 1 else results}
    return found


def _ran(run: dict) -> tuple[dict, dict[str, dict], str]:
    """A run that exited 0 and wrote one results file: (results, samples, log)."""
    assert run["status"] == "0", run["log"][-4000:]
    assert isinstance(run["results"], dict), (run["results"], run["log"][-2000:])
    return run["results"], run["samples"], run["log"]


@pytest.fixture(scope="module")
def session(setup):
    from merv.pipelines.generate import GenerateOptions, GenerationSession

    return GenerationSession(str(setup["export"]), GenerateOptions(max_new_tokens=6))


@pytest.fixture(scope="module")
def answers(setup, session) -> list[str]:
    """`merv generate`'s answers to the task's questions (greedy, the task's max_new_tokens), cut
    at lmms-eval's default stop string."""
    return [session.answer(str(setup["tasks"] / f"clip{i}.mp4"), q).split("\n\n")[0].strip()
            for i, q in enumerate(QUESTIONS)]


def test_lmms_eval_runs_merv_from_videos_then_from_the_store(setup, session, answers, lmms_runs):
    results, samples, log = _ran(lmms_runs["videos"])
    assert set(results["results"]) == {"merv_tiny_gen", "merv_tiny_mc"}
    assert 0.0 <= results["results"]["merv_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["results"]["merv_tiny_mc"]["acc,none"] <= 1.0
    assert "3 decoded and encoded" in log

    # the answers are `merv generate`'s for the same video and question
    assert sorted(samples["merv_tiny_gen"]) == list(range(len(QUESTIONS)))
    assert [_text(samples["merv_tiny_gen"][i]) for i in range(len(QUESTIONS))] == answers

    # the multiple-choice pick is the option `merv eval --mode loglik` would pick (highest mean log-likelihood)
    model = session.model
    for i, question in enumerate(QUESTIONS):
        feats = session.features(str(setup["tasks"] / f"clip{i}.mp4"))
        scores = model.option_loglikelihoods(feats, [question], [["red", "green", "blue"]]).normalized("mean")[0]
        nll = [float(r[0]) for r in samples["merv_tiny_mc"][i]["filtered_resps"]]
        assert [round(-s, 4) for s in scores] == [round(v, 4) for v in nll], i

    # from the store, with the videos moved away: the same answers, so nothing was decoded
    cached, cached_samples, cached_log = _ran(lmms_runs["store"])
    assert "3 visuals read from the store" in cached_log and "0 decoded" in cached_log
    assert cached["results"]["merv_tiny_gen"] == results["results"]["merv_tiny_gen"]
    assert cached["results"]["merv_tiny_mc"] == results["results"]["merv_tiny_mc"]
    for task in ("merv_tiny_gen", "merv_tiny_mc"):
        assert ({i: r["filtered_resps"] for i, r in cached_samples[task].items()}
                == {i: r["filtered_resps"] for i, r in samples[task].items()})


def test_bad_model_args_are_one_clear_error(setup):
    from merv.lmms.model import MervLMM

    with pytest.raises(ValueError, match="pretrianed.*not an option of the merv model"):
        MervLMM(pretrianed=str(setup["export"]))
    with pytest.raises(ValueError, match="needs pretrained="):
        MervLMM(store=str(setup["store"]))


def _text(sample: dict) -> str:
    got = sample["filtered_resps"]
    return (got[0] if isinstance(got, list) else got).split("\n\n")[0].strip()


@pytest.fixture(scope="module")
def server(setup):
    """`merv serve` on the export, on a free port of 127.0.0.1."""
    from merv.serve.process import serve_process

    with serve_process(setup["export"], ["--api-key", "sk-lmms", "--model-name", "merv-tiny"]) as running:
        yield running.api


def test_lmms_eval_openai_model_against_merv_serve(lmms_runs, answers):
    """lmms-eval's own OpenAI-compatible model, pointed at `merv serve` (videos passed by path),
    runs the task and gets `merv generate`'s answers."""
    results, samples, _ = _ran(lmms_runs["openai"])
    assert 0.0 <= results["results"]["merv_tiny_gen"]["exact_match,none"] <= 1.0
    assert [_text(samples["merv_tiny_gen"][i]) for i in range(len(QUESTIONS))] == answers
