"""The run configuration: strict loading, layering (recipe < file < flags < --set), recipes with the
paper's numbers, `--print-config`, a rerun from a run's own config.yaml, and `train/` importing
nothing from `pipelines` / `benchmarks`."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from testkit import tasks
from typer.testing import CliRunner

from merv import cli
from merv.train import configurable
from merv.train.config import FLAT_KEYS, RunConfig
from merv.train.configurable import ConfigError, dotted_keys, dump_config, load_config
from merv.train.metrics import read_metrics
from merv.train.model import STAGES
from merv.train.recipes import RECIPES, RecipeError, get_recipe, load_run_config

TRAIN_DIR = Path(__file__).resolve().parents[1] / "train"
# The 35 fields of the first release's flat TrainConfig: each is still one setting, by that name.
OLD_FLAT_KEYS = (
    "data", "stores", "recipe", "stage", "out_dir", "encoders", "projector", "tokens_per_frame", "fusion", "llm",
    "init_from", "global_batch_size", "micro_batch_size", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
    "epochs", "max_steps", "max_length", "seed", "checkpoint_every", "resume", "allow_config_change", "export",
    "online", "num_workers", "prefetch_factor", "buffer_shards", "activation_checkpointing", "device",
    "allow_missing", "join_key", "pool_at_load", "tensorboard", "progress",
)


def _file(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- strict loading


def test_unknown_keys_are_errors_naming_the_key_and_the_closest_valid_one(tmp_path):
    top = _file(tmp_path, "recipe: tiny\nlearning_rate: 0.1\n")
    assert "unknown key 'learning_rate'; did you mean optim.lr?" in _error(load_run_config, file=top)
    assert str(top) in _error(load_run_config, file=top)  # the file that holds it
    nested = _file(tmp_path, "optim:\n  learning_rate: 0.1\n", "nested.yaml")
    assert "unknown key 'optim.learning_rate'; did you mean optim.lr?" in _error(load_run_config, file=nested)
    deep = _file(tmp_path, '{"model": {"connector": {"projektor": "avg3d"}}}', "deep.json")
    message = _error(load_run_config, file=deep)
    assert "'model.connector.projektor'; did you mean model.connector.projector?" in message and "deep.json" in message
    message = _error(load_run_config, overrides=["loader.global_bach_size=4"])
    assert message.startswith("--set: unknown key 'loader.global_bach_size'; did you mean loader.global_batch_size?")


def test_wrong_types_and_invalid_values_name_the_key(tmp_path):
    assert "loader.global_batch_size" in _error(load_run_config, overrides=["loader.global_batch_size=many"])
    assert "model.connector: fusion 'nope' is unknown" in _error(load_run_config, overrides=["model.connector.fusion=nope"])
    assert "tokens_per_frame 60 is not a square" in _error(load_run_config, overrides=["model.connector.tokens_per_frame=60"])
    assert "warmup_ratio must be in [0, 1]" in _error(load_run_config, overrides=["schedule.warmup_ratio=2"])
    assert "model.llm: max_length must be positive" in _error(load_run_config, overrides=["model.llm.max_length=0"])
    assert "stage 'polish' is unknown" in _error(RunConfig().override, {"stage": "polish"})
    assert "checkpoint.resume" in _error(load_run_config, overrides=["checkpoint.resume=maybe"])
    bad = _file(tmp_path, "- a list\n")
    assert "holds a list" in _error(load_run_config, file=bad)
    with pytest.raises(RecipeError, match=r"'tyni' is unknown \(did you mean tiny\?\)"):
        load_run_config(flags={"recipe": "tyni"})
    with pytest.raises(RecipeError, match="'merv-frozen' has the stage\\(s\\) finetune, not 'align'"):
        load_run_config(flags={"recipe": "merv-frozen", "stage": "align"})


def test_a_config_error_is_one_line_on_the_command_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["train", "--set", "optim.learning_rate=1e-3", "--print-config"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --set: unknown key 'optim.learning_rate'")
    assert "did you mean optim.lr?" in lines[0] and "Traceback" not in result.output


# ----------------------------------------------------------------------------- layering


def test_precedence_recipe_then_file_then_flags_then_set(tmp_path):
    path = _file(tmp_path, "optim: {lr: 0.1, weight_decay: 0.5}\nloader: {global_batch_size: 6}\nschedule: {max_steps: 7}\n")
    from_file = load_run_config(file=path)
    assert (from_file.recipe, from_file.model.llm.name) == ("tiny", "tiny-llama")  # the default recipe below
    assert (from_file.optim.lr, from_file.optim.weight_decay, from_file.loader.global_batch_size) == (0.1, 0.5, 6)
    assert from_file.loader.micro_batch_size == get_recipe("tiny").loader.micro_batch_size  # untouched: the recipe's
    flags = load_run_config(file=path, flags={"lr": 0.2, "global_batch_size": 8})
    assert (flags.optim.lr, flags.loader.global_batch_size, flags.optim.weight_decay) == (0.2, 8, 0.5)
    top = load_run_config(file=path, flags={"lr": 0.2}, overrides=["optim.lr=0.3", "schedule.max_steps=null"])
    assert (top.optim.lr, top.schedule.max_steps) == (0.3, None)


def test_the_recipe_a_file_names_is_its_base_unless_a_flag_names_another(tmp_path):
    path = _file(tmp_path, "recipe: small\nstage: finetune\noptim: {lr: 0.5}\n")
    small = load_run_config(file=path)
    assert (small.recipe, small.model.llm.name, small.optim.lr) == ("small", "small-llama", 0.5)
    tiny = load_run_config(file=path, flags={"recipe": "tiny"})
    assert (tiny.recipe, tiny.model.llm.name, tiny.optim.lr) == ("tiny", "tiny-llama", 0.5)
    staged = load_run_config(flags={"recipe": "tiny", "stage": "full-align"})  # the stage picks the recipe's values
    assert (staged.stage, staged.optim.weight_decay) == ("full-align", 0.0)
    assert load_run_config(overrides=["recipe=merv-full", "stage=full-align"]).optim.lr == 1e-4


def test_print_config_reloads_to_the_same_run_config(tmp_path):
    args = ["train", "--print-config", "--recipe", "merv-full", "--stage", "full-align", "--data", "a.json",
            "--store", "s.zarr", "--lr", "3e-4", "--encoders", "dinov2,siglip", "--no-export", "--resume-auto",
            "--set", "model.connector.fusion=concat_channel", "--set", "parallel.activation_checkpointing=true"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    config = load_run_config(file=_file(tmp_path, result.stdout))
    assert config.to_dict() == printed
    assert config == load_run_config(flags={"recipe": "merv-full", "stage": "full-align", "data": ["a.json"],
                                            "stores": ["s.zarr"], "lr": 3e-4, "encoders": ["dinov2", "siglip"],
                                            "export": False, "resume": "auto"},
                                     overrides=["model.connector.fusion=concat_channel",
                                                "parallel.activation_checkpointing=true"])
    assert (config.optim.lr, config.model.encoders, config.checkpoint.resume) == (3e-4, ("dinov2", "siglip"), "auto")
    assert config.loader.global_batch_size == 256  # merv-full's Stage 1
    json_file = _file(tmp_path, json.dumps(printed), "run.json")  # JSON holds the same config
    assert load_run_config(file=json_file) == config


# ----------------------------------------------------------------------------- recipes


def _stages(name: str) -> list[str]:
    found = []
    for stage in STAGES:
        try:
            get_recipe(name, stage)
        except RecipeError:
            continue
        found.append(stage)
    return found


def test_every_recipe_is_a_complete_valid_run_config_with_the_papers_numbers(tmp_path):
    for name in RECIPES:
        stages = _stages(name)
        assert "finetune" in stages and get_recipe(name).stage == "finetune", name  # default: the last stage
        for stage in stages:
            config = get_recipe(name, stage)
            assert (config.recipe, config.stage) == (name, stage)
            assert RunConfig.from_dict(yaml.safe_load(dump_config(config))) == config  # complete and valid
    paper = {"finetune": (2e-5, 128, 0.1), "full-align": (1e-4, 256, 0.0), "align": (1e-3, 256, 0.0)}
    for name in ("merv-frozen", "merv-full", "merv-videollava-recipe", "paper-shape", "dinov2-single"):
        for stage in _stages(name):
            c = get_recipe(name, stage)
            assert (c.optim.lr, c.loader.global_batch_size, c.optim.weight_decay) == paper[stage], (name, stage)
            assert (c.schedule.warmup_ratio, c.optim.max_grad_norm, c.schedule.epochs) == (0.03, 1.0, 1), (name, stage)
            assert c.model.encoders == ("languagebind", "dinov2", "vivit", "siglip") or name.endswith("-single")
    assert _stages("merv-frozen") == ["finetune"]
    assert _stages("merv-full") == ["finetune", "full-align"] and _stages("merv-videollava-recipe") == ["align", "finetune"]
    assert get_recipe("merv-frozen").model.llm.name == "llama2-7b-pure"
    assert get_recipe("siglip-single").model.encoders == ("siglip",)
    assert get_recipe("siglip-single").model.connector.fusion == "fixed_mix"
    tiny = get_recipe("tiny")
    assert (tiny.model.encoder_size, tiny.model.llm.name, tiny.model.llm.max_length) == ("tiny", "tiny-llama", 512)
    assert (tiny.optim.lr, tiny.loader.global_batch_size, tiny.loader.micro_batch_size) == (1e-3, 8, 4)
    assert RunConfig() == get_recipe("merv-frozen").override({"recipe": None})  # the defaults are the paper's run


def test_the_config_defaults_are_defined_once():
    """The hyper-parameters' defaults live in the config dataclasses: the builders they feed have
    none, and the CLI's shorthand flags default to "not given" (the recipe / file decides)."""
    from merv.train.accounting import model_report
    from merv.train.build import build_merv
    from merv.train.schedule import build_optimizer

    for fn, names in ((build_merv, ("connector_config", "llm_source", "model_max_length")),
                      (build_optimizer, ("lr", "weight_decay", "betas")), (model_report, ("seq_len",))):
        params = inspect.signature(fn).parameters
        assert all(params[n].default is inspect.Parameter.empty for n in names), fn.__name__
    command = next(c for c in cli.app.registered_commands if c.name == "train")
    for name, param in inspect.signature(command.callback).parameters.items():
        default = param.default.default  # typer.Option(...)
        assert default in (None, False, []), (name, default)


def test_every_flag_and_old_flat_key_is_one_config_key():
    keys = set(dotted_keys(RunConfig))
    assert set(FLAT_KEYS.values()) <= keys
    assert len(set(FLAT_KEYS.values())) == len(FLAT_KEYS)  # one flag per key
    assert set(OLD_FLAT_KEYS) <= set(FLAT_KEYS)
    command = next(c for c in cli.app.registered_commands if c.name == "train")
    own = {"config_file", "overrides", "print_config", "resume_auto", "no_export", "quiet", "as_json"}
    flags = set(inspect.signature(command.callback).parameters) - own
    assert flags <= set(FLAT_KEYS), flags - set(FLAT_KEYS)
    # the eight knobs the first release could not reach from the command line, now with --set
    for knob in ("schedule.warmup_ratio", "optim.weight_decay", "optim.max_grad_norm", "loader.buffer_shards",
                 "loader.prefetch_factor", "data.pool_at_load", "parallel.activation_checkpointing", "logging.tensorboard"):
        assert knob in keys


# ----------------------------------------------------------------------------- configurable


def test_configurable_merges_overrides_and_round_trips():
    assert configurable.parse_overrides(["a.b=1", "a.c=[x, y]", "d=null", "e=x:y"]) == {
        "a": {"b": 1, "c": ["x", "y"]}, "d": None, "e": "x:y"}
    assert configurable.merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 3}, "l": [2]}) == {"a": {"b": 3, "c": 2}, "l": [2]}
    assert configurable.unflatten(configurable.flatten({"a": {"b": 1, "c": {"d": 2}}})) == {"a": {"b": 1, "c": {"d": 2}}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        configurable.parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="a value and sub-keys at once"):
        configurable.parse_overrides(["optim=1", "optim.lr=2"])
    assert configurable.closest("tpf", ["tokens_per_frame", "fusion"]) == "tokens_per_frame"
    loaded = load_config(RunConfig, base=get_recipe("tiny").to_dict(), overrides=["seed=3"])
    assert loaded.seed == 3 and loaded.model == get_recipe("tiny").model


# ----------------------------------------------------------------------------- rerun


def _merv_train(*args: str) -> Any:
    """`merv train ... --quiet` in this process (each run starts and ends its own process group)."""
    return CliRunner().invoke(cli.app, ["train", *args, "--quiet"])


@pytest.mark.integration
def test_a_run_reruns_exactly_from_its_own_config_yaml(tmp_path):
    data, store = tasks.make_task(tmp_path, n=8, per_shard=4)
    first = _merv_train("--data", data, "--store", store, "--out", str(tmp_path / "a"), "--max-steps", "2",
                        "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "5e-3", "--no-export",
                        "--set", "model.connector.fusion=concat_channel", "--set", "logging.tensorboard=false")
    assert first.exit_code == 0, first.output[-3000:]
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["optim"]["lr"] == 5e-3 and written["model"]["connector"]["fusion"] == "concat_channel"
    assert written["data"]["files"] == [str(Path(data).resolve())]  # reruns from any directory
    again = _merv_train("--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"))
    assert again.exit_code == 0, again.output[-3000:]
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == len(b) == 2
    assert a[0]["loss"] == b[0]["loss"] and [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["ids_rank0"] for r in a] == [r["ids_rank0"] for r in b]
    rerun = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert rerun["checkpoint"].pop("out_dir") == str(tmp_path / "b")
    written["checkpoint"].pop("out_dir")
    assert rerun == written


# ----------------------------------------------------------------------------- layering of packages


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (relative imports resolved inside merv.train)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = ["merv", "train", *path.relative_to(TRAIN_DIR).parent.parts]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_train_imports_nothing_from_pipelines_or_benchmarks():
    files = sorted(TRAIN_DIR.rglob("*.py"))
    assert len(files) > 20 and TRAIN_DIR / "trainer.py" in files
    bad = {f"{p.relative_to(TRAIN_DIR)}: {name}" for p in files for name in _imports(p)
           if name.startswith(("merv.pipelines", "merv.benchmarks", "pipelines", "benchmarks"))}
    assert bad == set()
    probe = TRAIN_DIR / "trainer.py"
    assert "merv.train.config" in _imports(probe) and "merv.train.resume.HARMLESS" in _imports(probe)
