"""One source of truth per setting: every config field declares its default, range and help once; the CLI's help,
the YAML files and the notebooks' parameter cells show those defaults or say why they differ."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpwb.app.bench import BenchConfig
from cpwb.app.runner import RunConfig, declared_parameters
from cpwb.core.errors import ConfigError
from cpwb.core.settings import check_settings, default_of, setting, settings_table, undocumented
from cpwb.engine.loss import CPLossConfig
from cpwb.steps.evaluation.config import EvaluateConfig
from cpwb.steps.experiment import QuickEvalConfig
from cpwb.steps.negatives.config import GenerateConfig
from cpwb.steps.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (TrainConfig, GenerateConfig, EvaluateConfig, QuickEvalConfig, RunConfig, BenchConfig, CPLossConfig)
DEFAULTS = {cls: {f.name: default_of(f) for f in dataclasses.fields(cls)} for cls in CONFIGS}

# Notebook parameters that deliberately differ from the dataclass default, and why (a new difference fails).
NOTEBOOK_DIFFERENCES = {
    ("01_hard_negatives", "n_pairs"): "12 anchors: a CPU-sized run (the CLI default is 50)",
    ("02_cp_training", "with_paradetox"): "in a chained run, 01's few pairs train together with ParaDetox's",
    ("02_cp_training", "steps"): "100 steps: a CPU-sized run in make run (-47% / -35% toxicity on seeds 0 / 1)",
    ("06_evaluation_report", "rtp_prompts"): "10 prompts x 5 samples: a CPU-sized sampled protocol",
    ("06_evaluation_report", "samples_per_prompt"): "10 prompts x 5 samples: a CPU-sized sampled protocol",
    ("06_evaluation_report", "toxigen_per_group"): "2 statements per group: CPU-sized",
    ("06_evaluation_report", "blackbox_texts"): "8 texts: CPU-sized",
    ("06_evaluation_report", "hellaswag_items"): "mc_items = 50: a CPU-sized fluency check in make run",
    ("06_evaluation_report", "piqa_items"): "mc_items sets HellaSwag and PIQA alike (50 each)",
    ("points/train_evaluate", "progress"): "a sweep point runs headless: no progress bars in its notebook",
}
# notebook -> (config, {notebook parameter: setting}) for the notebooks whose parameters are settings
NOTEBOOK_SETTINGS = {
    "01_hard_negatives": (GenerateConfig, {"n_pairs": "n_anchors", "model": "target_model"}),
    "02_cp_training": (TrainConfig, {}),
    "06_evaluation_report": (EvaluateConfig, {"mc_items": ("hellaswag_items", "piqa_items")}),
    "points/train_evaluate": ((TrainConfig, QuickEvalConfig), {}),
}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_has_help_text(cls):
    assert undocumented(cls) == []
    assert all(row["help"] and row["default"] for row in settings_table(cls))


def test_a_setting_is_checked_against_its_declared_range():
    @dataclasses.dataclass
    class Toy:
        rate: float = setting(0.5, "a rate", check="(0,1]")
        steps: int = setting(1, "steps", check=">=1")

    check_settings(Toy())
    with pytest.raises(ConfigError, match=r"rate: must be in \(0, 1\], got 1.5"):
        check_settings(Toy(rate=1.5))
    with pytest.raises(ConfigError, match="steps: must be >= 1, got 0"):
        check_settings(Toy(steps=0))
    with pytest.raises(ConfigError, match="rate: must be in"):
        check_settings(Toy(rate=float("nan")))


def test_loss_settings_of_the_trainer_are_the_loss_config_s_own():
    for name in ("negatives", "tau", "alpha", "anchor_weight", "phi_form", "detach_prototype", "prototype"):
        train_field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
        loss_field = {f.name: f for f in dataclasses.fields(CPLossConfig)}[name]
        assert default_of(train_field) == default_of(loss_field)
        assert train_field.metadata == loss_field.metadata


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("generate", GenerateConfig),
                                          ("evaluate", EvaluateConfig)])
def test_help_lists_every_setting_with_default_and_meaning(command, cls):
    text = subprocess.run([sys.executable, "-m", "cpwb", command, "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"COLUMNS": "200", "PATH": ""}).stdout
    flat = " ".join(text.split())
    for row in settings_table(cls):
        option = f"--{row['name'].replace('_', '-')}"
        assert option in text, f"{option} missing from `cpwb {command} --help`"
        assert " ".join(row["help"].split())[:40] in flat
    if cls is TrainConfig:
        for name, default in (("tau", "0.5"), ("alpha", "1.0"), ("lr", "0.0004"), ("kl-weight", "2.0")):
            assert f"--{name}" in flat and f"default {default}" in flat


def test_sweep_help_lists_the_point_settings():
    text = subprocess.run([sys.executable, "-m", "cpwb", "sweep", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120).stdout
    for cls in (TrainConfig, QuickEvalConfig):
        assert all(f"  {f.name}  (" in text for f in dataclasses.fields(cls))


@pytest.mark.parametrize("file, cls", [("cp_default.yaml", TrainConfig), ("generate_default.yaml", GenerateConfig),
                                       ("evaluate_default.yaml", EvaluateConfig)])
def test_default_yaml_files_show_the_defaults(file, cls):
    shown = yaml.safe_load((ROOT / "configs" / file).read_text())
    differing = {k: (v, DEFAULTS[cls][k]) for k, v in shown.items() if k != "output_dir" and v != DEFAULTS[cls][k]}
    assert not differing, f"configs/{file} disagrees with {cls.__name__}: {differing}"


def test_the_ablation_grid_s_base_is_the_default_configuration():
    base = yaml.safe_load((ROOT / "configs" / "ablations.yaml").read_text())["base"]
    defaults = {**DEFAULTS[TrainConfig], **DEFAULTS[QuickEvalConfig]}
    assert {k: v for k, v in base.items() if v != defaults[k]} == {}


def _literal(text: str):
    import ast

    return ast.literal_eval(text)


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_SETTINGS))
def test_notebook_parameters_show_the_defaults_or_say_why_not(notebook):
    config, renames = NOTEBOOK_SETTINGS[notebook]
    defaults = {k: v for cls in (config if isinstance(config, tuple) else (config,)) for k, v in DEFAULTS[cls].items()}
    declared = declared_parameters(ROOT / "notebooks" / f"{notebook}.ipynb")
    compared = 0
    for name, info in declared.items():
        targets = renames.get(name, name)
        for target in targets if isinstance(targets, tuple) else (targets,):
            if target not in defaults or target == "output_dir":
                continue
            compared += 1
            value = _literal(info["default"])
            value = None if value == "" else value  # notebooks write "" for none (a typed papermill parameter)
            if value != defaults[target] and (notebook.split("/")[-1], target) not in NOTEBOOK_DIFFERENCES \
                    and (notebook, name) not in NOTEBOOK_DIFFERENCES:
                pytest.fail(f"{notebook}: parameter {name} = {value!r} but {target} defaults to {defaults[target]!r}; "
                            "use the default or record why in NOTEBOOK_DIFFERENCES")
    assert compared >= 5


def test_train_runs_without_a_config_file(tmp_path, default_lm):
    from cpwb.app.cli import main
    from cpwb.data.pairs import PairRecord, PairText, write_pairs
    from tests.conftest import make_tiny_lm

    make_tiny_lm(default_lm[1]).save_pretrained(tmp_path / "model")
    default_lm[1].save_pretrained(tmp_path / "model")
    write_pairs(tmp_path / "pairs.jsonl", [PairRecord(f"p{i}", f"calm words {i}", (PairText(f"kind {i}", "human"),),
                                                      (PairText(f"rude {i}", "human"),)) for i in range(4)])
    assert main(["train", "-p", "steps=2", "-p", f"output_dir={tmp_path / 'run'}", "--model", str(tmp_path / "model"),
                 "--pairs", str(tmp_path / "pairs.jsonl"), "--holdout-fraction", "0", "--progress", "false",
                 "--anchors-per-step", "2", "--kl-weight", "0"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["kl_weight"] == 0.0 and saved["tau"] == DEFAULTS[TrainConfig]["tau"]


def test_the_sweep_point_notebook_declares_every_setting():
    """Sweeps inject a point's complete settings; one missing from the parameters cell runs with a papermill warning
    and goes undocumented in the notebook."""
    declared = declared_parameters(ROOT / "notebooks" / "points" / "train_evaluate.ipynb")
    assert sorted((set(DEFAULTS[TrainConfig]) | set(DEFAULTS[QuickEvalConfig])) - set(declared)) == []
