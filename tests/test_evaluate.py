"""Benchmark evaluation from a feature store on a tiny MervModel: reference-format MCQ sets in both
modes (generation + letter extraction, option log-likelihood), windows carried from the benchmark
through the extraction manifest into the store and checked, sharding + merge, resume, summaries,
open-ended prediction with normalised-match scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from testkit.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module

from merv.extract.sources import read_manifest
from merv.pipelines import evaluate as E
from merv.store import EncoderGroupSpec, FeatureStore, SampleRecord
from merv.train.model import GenerationOutput
from merv.train.prompts import get_prompt_builder, tokenize_conversation
from merv.train.tiny import build_tiny_merv

WORDS = ["What", "How", "Why", "Where", "Is", "who"]
N_VIDEOS = 5


@pytest.fixture(scope="module")
def model() -> Any:
    m, _ = build_tiny_merv(seed=0)
    return m.eval()


def write_mcq_benchmark(root: Path, n_videos: int = N_VIDEOS) -> Path:
    """Perception-Test-shaped set: 2 questions per video, 3-5 options, end_frame per video; vid0 named with its extension."""
    rng = np.random.default_rng(1)
    qs, ans = [], []
    for v in range(n_videos):
        for j in range(2):
            n = 3 + (v + j) % 3
            qid = f"mc_{v}_{j}"
            qs.append({
                "video_name": "vid0.mp4" if v == 0 else f"vid{v}",
                "question_id": qid,
                "question": f"{WORDS[(v + j) % len(WORDS)]} happens in clip {v} part {j}?",
                "options": [f"choice {k} of {qid}" for k in range(n)],
                "num_option": n,
                "end_frame": 40 + v,
            })
            ans.append({"question_id": qid, "answer_id": int(rng.integers(n))})
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_q.json").write_text(json.dumps(qs))
    (root / "test_a.json").write_text(json.dumps(ans))
    (root / "videos").mkdir(exist_ok=True)
    for v in range(n_videos):
        (root / "videos" / f"vid{v}.mp4").write_bytes(b"not decoded: features are written directly")
    return root


def write_open_benchmark(root: Path, n_videos: int = N_VIDEOS) -> Path:
    qs, ans = [], []
    for v in range(n_videos):
        qid = f"oe_{v}"
        qs.append({"video_name": f"vid{v}", "question_id": qid, "question": f"{WORDS[v % len(WORDS)].lower()} is shown in clip {v}?"})
        ans.append({"question_id": qid, "answer": ["cooking", "dog", "two", "yes", "park"][v % 5]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_q.json").write_text(json.dumps(qs))
    (root / "test_a.json").write_text(json.dumps(ans))
    return root


def fill_store(url: Path, records: list[SampleRecord], model: Any, seed: int = 0) -> FeatureStore:
    """A store holding random features of the model's encoders for these samples."""
    store = FeatureStore.create(url, samples_per_shard=3)
    store.add_samples(records)
    rng = np.random.default_rng(seed)
    for s in model.connector.specs:
        g = store.ensure_group(EncoderGroupSpec(s.name, f"fp-{s.name}", s.grid, s.dim, framewise=True))
        for shard in range(g.num_shards("video")):
            rows = g.shard_range("video", shard)
            g.write_shard("video", shard, rng.standard_normal((len(rows), *s.grid, s.dim)).astype(np.float16))
    return store


@pytest.fixture(scope="module")
def setup(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    mcq = write_mcq_benchmark(root / "eval_data" / "percep")
    manifest = E.write_eval_manifest(mcq, root / "percep_manifest.jsonl")
    records = read_manifest(manifest)  # exactly what `merv extract` reads
    store_path = root / "features.zarr"
    fill_store(store_path, records, model)
    return {"root": root, "mcq": mcq, "manifest": manifest, "records": records, "store": str(store_path)}


@pytest.fixture(scope="module")
def unsharded(model: Any, setup: dict[str, Any]) -> dict[str, Any]:
    """Single-process results in both modes (shared by the end-to-end and the sharding tests)."""
    out = setup["root"] / "unsharded"
    summary = E.evaluate(model, [setup["mcq"]], setup["store"], out, mode="generate", batch_size=4, max_new_tokens=6)
    E.evaluate(model, [setup["mcq"]], setup["store"], out, mode="loglik", batch_size=3)
    return {"out": out, "summary": summary}


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rows_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Equal rows; floats (weights, option scores) to 1e-4 (batch composition may move the last bits)."""
    assert len(a) == len(b)

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return math.isclose(float(x), float(y), abs_tol=1e-4)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        return x == y

    for ra, rb in zip(a, b):
        assert same(ra, rb), (ra, rb)


# ---------------------------------------------------------------------------------- ids, windows


def test_manifest_carries_windows_into_the_store(setup: dict[str, Any]) -> None:
    rows = [json.loads(x) for x in setup["manifest"].read_text().splitlines()]
    ids = [f"vid{v}@ef{40 + v}" for v in range(N_VIDEOS)]  # "vid0.mp4" -> "vid0"; the window is part of the id
    assert [r["id"] for r in rows] == ids
    assert [r["end_frame"] for r in rows] == [40 + v for v in range(N_VIDEOS)]
    assert all(Path(r["path"]).is_file() for r in rows)
    table = FeatureStore.open(setup["store"]).samples
    assert [table.record(table.index[i]).end_frame for i in ids] == [40 + v for v in range(N_VIDEOS)]


def test_sample_ids_name_video_and_window(tmp_path: Path) -> None:
    qs = [
        {"video_name": "clipA", "question_id": 1, "question": "what?", "time": [1.5, 4.0]},
        {"video_name": "clipA", "question_id": 2, "question": "who?", "time": [6, 9]},
        {"video_name": "clipB.mp4", "question_id": 3, "question": "why?", "start": 2, "end": 3},
        {"video_name": "clipC", "question_id": 4, "question": "how?", "end_frame": -1},
        {"video_name": "clipD.webm", "question_id": 5, "question": "how?", "end_frame": "120"},
        {"video_name": "clipE", "question_id": 6, "question": "how?", "end": 7.25},
    ]
    (tmp_path / "test_q.json").write_text(json.dumps(qs))
    (tmp_path / "test_a.json").write_text(json.dumps([{"question_id": q["question_id"], "answer": "x"} for q in qs]))
    bench = E.load_benchmark(tmp_path)
    assert bench.kind == "open"
    assert bench.questions[3].window.empty  # negative end_frame means none, as in the reference
    # every windowed clip is qualified, whether or not the benchmark asks about the video twice
    assert E.sample_ids(bench.questions) == ["clipA@1.5-4s", "clipA@6-9s", "clipB@2-3s", "clipC", "clipD@ef120", "clipE@0-7.25s"]
    assert E.sample_ids(bench.questions, "tvqa/")[:2] == ["tvqa/clipA@1.5-4s", "tvqa/clipA@6-9s"]
    assert E.Window(None, 7.25).same_as(E.Window(0.0, 7.25))  # a missing start is the beginning
    with pytest.raises(E.EvalError, match="not found"):
        E.eval_manifest(bench, video_dir=tmp_path)


def test_load_benchmark_rejects_bad_answers(tmp_path: Path) -> None:
    write_mcq_benchmark(tmp_path)
    ans = json.loads((tmp_path / "test_a.json").read_text())
    ans[0]["answer_id"] = 7
    (tmp_path / "test_a.json").write_text(json.dumps(ans))
    with pytest.raises(E.EvalError, match="answer_id 7"):
        E.load_benchmark(tmp_path)
    (tmp_path / "test_a.json").write_text(json.dumps(ans[1:]))
    with pytest.raises(E.EvalError, match="no answer for 1"):
        E.load_benchmark(tmp_path)


def test_shard_bounds_partition() -> None:
    for n, w in [(10, 2), (7, 3), (2, 4), (0, 2)]:
        parts = [E.shard_bounds(n, r, w) for r in range(w)]
        covered = [i for a, b in parts for i in range(a, b)]
        assert covered == list(range(n))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    with pytest.raises(E.EvalError):
        E.shard_bounds(5, 2, 2)


# ------------------------------------------------------------------------------------------- MCQ


def test_mcq_end_to_end_both_modes(setup: dict[str, Any], unsharded: dict[str, Any]) -> None:
    out, summary = unsharded["out"], unsharded["summary"]
    bench = E.load_benchmark(setup["mcq"])
    for mode in ("generate", "loglik"):
        rows = read_rows(out / "percep" / mode / "predictions.jsonl")
        assert [r["question_id"] for r in rows] == [q.question_id for q in bench.questions]
        for r, q in zip(rows, bench.questions):
            assert r["end_frame"] == q.window.end_frame and r["sample_id"] == f"{E.video_stem(q.video_name)}@ef{q.window.end_frame}"
            assert "store_id" not in r
            assert r["answer"] == "ABCDE"[q.answer_id] and r["skill"] == q.question.split()[0].lower()
            assert set(r["fusion_weights"]) == {"enc_a", "enc_b"}
            assert sum(r["fusion_weights"].values()) == pytest.approx(1.0, abs=1e-5)
            assert r["correct"] == (r["letter"] == r["answer"])
        if mode == "loglik":
            for r in rows:
                assert len(r["option_scores"]) == r["num_option"] and r["valid"]
                assert r["letter"] == "ABCDE"[int(np.argmax(r["option_scores"]))]
    # one video's fusion weights do not depend on the question or the mode
    g, ll = (read_rows(out / "percep" / m / "predictions.jsonl") for m in ("generate", "loglik"))
    assert g[0]["fusion_weights"] == g[1]["fusion_weights"]
    assert g[0]["fusion_weights"] == pytest.approx(ll[0]["fusion_weights"], abs=1e-5)

    assert summary is not None and set(summary["benchmarks"]["percep"]) == {"generate"}
    full = json.loads((out / "summary.json").read_text())["benchmarks"]["percep"]
    s = full["loglik"]
    assert s["n"] == 10 and s["invalid"] == 0 and s["metric"] == "letter"
    assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in ll]))
    assert s["chance"] == pytest.approx(np.mean([1 / r["num_option"] for r in ll]))
    assert sum(v["n"] for v in s["by_skill"].values()) == 10
    assert set(s["by_skill"]) == {w.lower() for w in WORDS}
    md = (out / "summary.md").read_text()
    assert "| percep | loglik | letter | 10 |" in md and "| percep | generate | letter | 10 |" in md


def test_generation_letters_are_scored(model: Any, setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted outputs in many formats: correct, wrong and malformed answers are counted as they should."""
    bench = E.load_benchmark(setup["mcq"])
    by_text = {q.question: q for q in bench.questions}
    formats = ["(X)", "Answer: x", "The answer is X.", "X. whatever", "garbage output", ""]
    script: dict[str, str] = {}
    for i, q in enumerate(bench.questions):
        fmt = formats[i % len(formats)]
        letter = q.answer_letter if i % 4 != 3 else "ABCDE"[(q.answer_id + 1) % q.num_option]  # every 4th is wrong
        script[q.qid] = fmt.replace("X", letter).replace("x", letter.lower())
    seen_prompts: list[str] = []

    def fake_generate(features: dict[str, torch.Tensor], prompt: list[list[int]], **kw: Any) -> GenerationOutput:
        assert kw["do_sample"] is False
        texts = []
        for ids in prompt:
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            seen_prompts.append(text)
            q = next(q for t, q in by_text.items() if t in text)
            texts.append(script[q.qid])
        return GenerationOutput(texts=texts)

    monkeypatch.setattr(model, "generate", fake_generate)
    E.evaluate(model, [setup["mcq"]], setup["store"], tmp_path, batch_size=4)
    rows = read_rows(tmp_path / "percep" / "generate" / "predictions.jsonl")
    expect_valid = [bool(script[r["question_id"]].strip()) and "garbage" not in script[r["question_id"]] for r in rows]
    assert [r["valid"] for r in rows] == expect_valid
    expect_correct = [v and i % 4 != 3 for i, v in enumerate(expect_valid)]
    assert [r["correct"] for r in rows] == expect_correct
    assert [r["pred"] for r in rows] == [script[r["question_id"]] for r in rows]
    s = json.loads((tmp_path / "percep" / "generate" / "summary.json").read_text())
    assert s["accuracy"] == pytest.approx(sum(expect_correct) / len(rows))
    assert s["invalid"] == expect_valid.count(False)
    # the reference's first-character rule only credits the "X. whatever" answers
    assert s["reference_accuracy"] == pytest.approx(
        sum(r["correct"] and script[r["question_id"]][1:2] == "." for r in rows) / len(rows)
    )
    # the prompt is the reference's MCQ text inside the model's prompt format ("In: ... Out:")
    q0 = bench.questions[0]
    assert any(p.startswith("In: " + q0.question + " Select the correct answer") and p.endswith("Out:") for p in seen_prompts)
    assert "Write your answer as only one of A, B, C and nothing else.\n\n    A. choice 0 of mc_0_0\nB." in seen_prompts[0]


def test_loglik_equals_the_training_loss(model: Any, setup: dict[str, Any]) -> None:
    """`MervModel.option_loglikelihoods` gives the answer-token log-likelihoods the training loss sees
    (one conversation at a time through `forward`), for options of different lengths and counts."""
    bench = E.load_benchmark(setup["mcq"])
    feats = E.StoreFeatures(model, setup["store"], fingerprints=None, check_windows=True)
    qs = bench.questions[1:4]  # different option counts, different videos
    x = feats.read([q.sample_id() for q in qs], model.device)
    res = model.option_loglikelihoods(x, [q.message for q in qs], [q.choices for q in qs])
    assert res.fusion_weights is not None and res.fusion_weights.shape == (3, 2)
    assert [len(s) for s in res.sums] == [q.num_option for q in qs]
    tok = model.tokenizer
    for j, q in enumerate(qs):
        one = {n: v[j : j + 1] for n, v in x.items()}
        for k, opt in enumerate(q.choices):
            conv = [{"from": "human", "value": q.message}, {"from": "gpt", "value": opt}]
            ids, lab = tokenize_conversation(get_prompt_builder(model.prompt_format, tok), tok, conv)
            with torch.no_grad():
                out = model(one, ids[None], labels=lab[None], loss_reduction="sum")
            assert res.counts[j][k] == int(out.num_label_tokens)
            assert res.sums[j][k] == pytest.approx(-float(out.loss), abs=1e-4)
        assert torch.allclose(res.fusion_weights[j], out.fusion_weights[0], atol=1e-6)
    norm = res.normalized("mean")
    assert norm[0][0] == pytest.approx(res.sums[0][0] / res.counts[0][0])
    assert res.normalized("sum") == res.sums


def test_sharded_then_merged_equals_unsharded(model: Any, setup: dict[str, Any], unsharded: dict[str, Any], tmp_path: Path) -> None:
    for mode in ("generate", "loglik"):
        for rank in range(2):
            E.run_benchmark(model, setup["mcq"], setup["store"], tmp_path / "two", mode=mode, rank=rank, world_size=2,
                            batch_size=4, max_new_tokens=6)
        one = read_rows(unsharded["out"] / "percep" / mode / "predictions.jsonl")
        two_dir = tmp_path / "two" / "percep" / mode
        parts = [read_rows(E.rank_file(two_dir, r, 2)) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == 5
        assert not {r["question_id"] for r in parts[0]} & {r["question_id"] for r in parts[1]}
        two = read_rows(E.merge_predictions(two_dir))
        assert_rows_equal(one, two)
    s1 = json.loads((unsharded["out"] / "summary.json").read_text())
    s2 = E.finalize_results(tmp_path / "two", world_size=2)
    for mode in ("generate", "loglik"):
        a, b = s1["benchmarks"]["percep"][mode], s2["benchmarks"]["percep"][mode]
        assert (a["n"], a["accuracy"], a["invalid"]) == (b["n"], b["accuracy"], b["invalid"])


def test_merge_refuses_missing_ranks(model: Any, setup: dict[str, Any], tmp_path: Path) -> None:
    E.run_benchmark(model, setup["mcq"], setup["store"], tmp_path, mode="loglik", rank=1, world_size=2)
    with pytest.raises(E.EvalError, match=r"5 of 10 questions answered.*\{2: \[0\]\}"):
        E.merge_predictions(tmp_path / "percep" / "loglik")


def test_resume_answers_only_what_is_left(model: Any, setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = E.run_benchmark(model, setup["mcq"], setup["store"], tmp_path / "a", mode="loglik", batch_size=4)
    full = read_rows(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # a killed writer's last line
    asked: list[int] = []
    real = model.option_loglikelihoods

    def counting(feats: Any, messages: Any, options: Any) -> Any:
        asked.append(len(messages))
        return real(feats, messages, options)

    monkeypatch.setattr(model, "option_loglikelihoods", counting)
    E.run_benchmark(model, setup["mcq"], setup["store"], tmp_path / "a", mode="loglik", batch_size=4)
    assert sum(asked) == 7
    assert_rows_equal(read_rows(E.merge_predictions(path.parent)), full)
    with pytest.raises(E.EvalError, match="other settings \\(ll_norm\\)"):
        E.run_benchmark(model, setup["mcq"], setup["store"], tmp_path / "a", mode="loglik", ll_norm="sum")
    other, _ = build_tiny_merv(seed=1)  # another checkpoint must not reuse these rows
    with pytest.raises(E.EvalError, match="other settings \\(model\\)"):
        E.run_benchmark(other.eval(), setup["mcq"], setup["store"], tmp_path / "a", mode="loglik")


def test_store_problems_are_named(model: Any, setup: dict[str, Any], tmp_path: Path) -> None:
    # features extracted with another window than the benchmark asks for
    recs = [SampleRecord(r.id, r.source, end_frame=(r.end_frame or 0) + (5 if r.id == "vid2@ef42" else 0)) for r in setup["records"]]
    recs = [r for r in recs if r.id != "vid4@ef44"]  # and one clip never extracted
    store = tmp_path / "other.zarr"
    fill_store(store, recs, model)
    with pytest.raises(E.EvalError, match=r"4 question\(s\) of 'percep' on 2 clip\(s\).*vid2@ef42 \(extracted with window \{'end_frame': 47\}.*asks \{'end_frame': 42\}"):
        E.run_benchmark(model, setup["mcq"], str(store), tmp_path / "x", mode="loglik")
    path = E.run_benchmark(model, setup["mcq"], str(store), tmp_path / "y", mode="loglik", skip_missing=True, check_windows=False)
    rows = read_rows(path)
    bad = [r for r in rows if r.get("error")]
    assert [r["sample_id"] for r in bad] == ["vid4@ef44", "vid4@ef44"] and bad[0]["error"] == "not in the store"
    assert not any(r["correct"] for r in bad) and len(rows) == 10
    assert E.summarize_rows(rows)["errors"] == 2


# ------------------------------------------------------------------------------------ open-ended


def test_open_ended_predictions_and_match(model: Any, setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = write_open_benchmark(tmp_path / "msvd")
    # the open set asks about the MCQ set's videos without a window: its clips go into the same store
    records = setup["records"] + read_manifest(E.write_eval_manifest(bench_dir, tmp_path / "m.jsonl", video_dir=setup["mcq"] / "videos"))
    store = str(fill_store(tmp_path / "both.zarr", records, model).url)
    # real generation: plumbing, rows, fusion weights
    path = E.run_benchmark(model, bench_dir, store, tmp_path / "real", max_new_tokens=5)
    rows = read_rows(path)
    assert len(rows) == N_VIDEOS and all(isinstance(r["pred"], str) and r["fusion_weights"] for r in rows)
    assert [r["sample_id"] for r in rows] == [f"vid{v}" for v in range(N_VIDEOS)]
    with pytest.raises(E.EvalError, match="open-ended"):
        E.run_benchmark(model, bench_dir, store, tmp_path / "real", mode="loglik")

    replies = {"oe_0": "The man is cooking.", "oe_1": "a cat", "oe_2": "Two.", "oe_3": "no", "oe_4": "in a park"}

    def fake_generate(features: dict[str, torch.Tensor], prompt: list[list[int]], **kw: Any) -> GenerationOutput:
        out = []
        for ids in prompt:
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            v = int(text.split("clip ")[1].split("?")[0])
            out.append(replies[f"oe_{v}"])
        return GenerationOutput(texts=out)

    monkeypatch.setattr(model, "generate", fake_generate)
    summary = E.evaluate(model, [bench_dir], store, tmp_path / "scripted")
    scored = read_rows(tmp_path / "scripted" / "msvd" / "generate" / "scored.jsonl")
    assert [r["match"] for r in scored] == [True, False, True, False, True]
    s = summary["benchmarks"]["msvd"]["generate"]
    assert s["metric"] == "match" and s["accuracy"] == pytest.approx(0.6) and "chance" not in s
    assert s["by_skill"]["what"] == {"n": 1, "accuracy": 1.0, "match_accuracy": 1.0}
