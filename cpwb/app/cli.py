"""The `cpwb` command: run the notebooks, list assets, validate pairs, generate, train, export, evaluate, report,
rescore, sweep, tune, bench.

Every setting of `generate`, `train` and `evaluate` is an option of its own (`--tau 0.3`), listed by `--help` with
its default, range and meaning, all taken from the config dataclasses. `--config FILE` (YAML) is optional; `-p
key=value` and the options override it. Errors cpwb raises on purpose become one line and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from cpwb import __version__
from cpwb.core.errors import CpwbError
from cpwb.core.settings import add_setting_options, given_settings, settings_help


def _overrides(pairs: list[str]) -> dict:
    """`-p key=value` options as a dict."""
    from cpwb.core.config import parse_override

    return dict(parse_override(p) for p in pairs)


def load_settings(cls: type, args: argparse.Namespace) -> Any:
    """The config of a command: defaults, then `--config FILE`, then `-p key=value`, then `--name value` options."""
    from cpwb.core.config import from_dict, load_yaml_config

    overrides = {**_overrides(args.param), **given_settings(args)}
    return load_yaml_config(cls, args.config, overrides) if args.config else from_dict(cls, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    """Execute the ordered notebooks with papermill into outputs/<run-id>/."""
    from cpwb.app.runner import RunConfig, raise_on_failure, run_notebooks
    from cpwb.core.config import from_dict, load_yaml_config

    extra = {"notebooks": args.notebooks.split(",")} if args.notebooks else {}
    extra |= {"run_id": args.run_id} if args.run_id else {}
    extra |= {"force": True} if args.force else {}
    config = load_yaml_config(RunConfig, args.config, extra) if args.config else from_dict(RunConfig, extra)
    config.parameters = {**config.parameters, **_overrides(args.param)}
    config.progress = not args.quiet
    started = time.time()
    run_dir, results = run_notebooks(config, say=lambda line: print(line, flush=True))
    raise_on_failure(results)
    report = run_dir / "report.html"
    print(f"run folder: {run_dir}" + (f"\nreport: {report}" if report.is_file() else "")
          + f"\ntotal: {time.time() - started:.0f} s")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    """List the embedded default assets with origin, license and checksum."""
    from cpwb.engine.assets import asset_table, cache_dir

    for row in asset_table(with_checksums=not args.no_checksums):
        print(f"{row['name']}\n  role:    {row['role']}\n  package: {row['package']}\n"
              f"  origin:  {row['origin']}\n  license: {row['license']}\n  file:    {row['file']}\n"
              f"  sha256:  {row['sha256']}")
    print(f"cache: {cache_dir()}")
    return 0


def cmd_validate_pairs(args: argparse.Namespace) -> int:
    """Check a pairs JSONL file, printing one line per problem."""
    from cpwb.data.pairs import validate_pairs_file

    problems = validate_pairs_file(Path(args.path))
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.path}: ok")
    return 1 if problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a CP (or baseline) adapter."""
    from cpwb.steps.training.config import TrainConfig
    from cpwb.steps.training.trainer import train

    result = train(load_settings(TrainConfig, args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, the main process speaks for all
        print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.jsonl'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's adapter merged into its base model (or the adapter alone) as a folder of its own."""
    from cpwb.steps.training.export import export

    print(f"{'merged model' if args.merge else 'adapter'}: {export(args.run_dir, args.out, args.merge, args.model)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate hard negatives by adversarial paraphrasing; re-running resumes."""
    from cpwb.steps.negatives.config import GenerateConfig
    from cpwb.steps.negatives.run import describe_run, run_generation

    config = load_settings(GenerateConfig, args)
    run_generation(config)
    print(describe_run(config.output_dir))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model (and adapter) on the configured protocols into output_dir; re-running resumes."""
    from cpwb.steps.evaluation.config import EvaluateConfig
    from cpwb.steps.evaluation.run import describe, run_evaluation

    print(describe(run_evaluation(load_settings(EvaluateConfig, args))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """report.html of evaluation folders: metrics with intervals, differences from the base, scorer agreement.
    A name given several folders (one model's presets) shows them in one column."""
    import tempfile

    from cpwb.analysis.report import build_report, write_report
    from cpwb.analysis.report_inputs import merge_evaluations
    from cpwb.core.errors import InputError

    named: dict[str, list[str]] = {}
    for item in args.folders:
        name, _, folder = item.rpartition("=")
        if not (Path(folder) / "metrics.json").is_file():
            raise InputError("not an evaluation folder (no metrics.json)", folder)
        named.setdefault(name or Path(folder).name, []).append(folder)
    with tempfile.TemporaryDirectory(prefix="cpwb-report-") as scratch:
        folders = {name: paths[0] if len(paths) == 1 else merge_evaluations(paths, Path(scratch) / str(index))
                   for index, (name, paths) in enumerate(named.items())}
        report = build_report(folders)
        path = write_report(args.out, report, title=args.title or f"cpwb evaluation: {', '.join(folders)}")
    print(report.differences.round(4).to_string(index=False) if len(report.differences) else "", f"\nreport: {path}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    """Score evaluation folders' (or sweep points') continuations again with another toxicity scorer."""
    from cpwb.engine.scoring import load_toxicity_scorer
    from cpwb.steps.evaluation.rescore import rescore
    from cpwb.steps.experiment import rescore_point

    scorer = load_toxicity_scorer(args.scorer, **_overrides(args.param))
    for folder in args.folders:
        if (Path(folder) / "result.json").is_file():  # a sweep point or tuning trial
            added = rescore_point(folder, scorer, batch_size=args.batch_size)
            print(f"{folder}: {', '.join(added)} by {scorer.name}")
            continue
        rows = rescore(folder, scorer, batch_size=args.batch_size)
        print(f"{folder}: {len(rows)} figures by {scorer.name}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a parameter grid of train-and-evaluate points into outputs/sweeps/<name>/ (see cpwb.app.sweep)."""
    from cpwb.app.sweep import command

    return command(args)


def cmd_tune(args: argparse.Namespace) -> int:
    """Run (or join) an equal-budget Optuna study of one method (see cpwb.app.tune)."""
    from cpwb.app.tune import command

    return command(args)


def _param_option(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                         help=f"{what}, value read as YAML (repeatable)")


def _configured(sub, name: str, cls: type, help_text: str, func) -> argparse.ArgumentParser:
    """A sub-command whose settings are the fields of dataclass `cls`: optional --config, -p, one option each."""
    command = sub.add_parser(name, help=help_text, description=f"{help_text}.\n\nSettings come from the defaults, "
                             "then --config, then -p KEY=VALUE, then the options below.",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--config", help=f"YAML file of {cls.__name__} settings (optional; see configs/)")
    _param_option(command, "override a setting")
    add_setting_options(command.add_argument_group(f"settings ({cls.__name__}; values read as YAML)"), cls)
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per capability."""
    from cpwb.app.runner import RunConfig
    from cpwb.steps.evaluation.config import EvaluateConfig
    from cpwb.steps.experiment import QuickEvalConfig
    from cpwb.steps.negatives.config import GenerateConfig
    from cpwb.steps.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="cpwb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"cpwb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks with papermill into outputs/<run-id>/",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="RunConfig settings (for --config):\n" + settings_help(RunConfig))
    run.add_argument("--config", help="YAML file of RunConfig settings")
    run.add_argument("--notebooks", help="comma-separated notebook names or numbers (default: all, in order)")
    run.add_argument("--run-id", help="folder name under outputs/ (default: derived, so a re-run resumes)")
    _param_option(run, "notebook parameter")
    run.add_argument("--force", action="store_true", help="re-execute notebooks already completed")
    run.add_argument("--quiet", action="store_true", help="no progress bar over each notebook's cells")
    run.set_defaults(func=cmd_run)

    assets = sub.add_parser("assets", help="list the embedded default assets with license and checksum")
    assets.add_argument("--no-checksums", action="store_true", help="skip hashing the files")
    assets.set_defaults(func=cmd_assets)

    validate = sub.add_parser("validate-pairs", help="check a pairs JSONL file, one line per problem")
    validate.add_argument("path")
    validate.set_defaults(func=cmd_validate_pairs)
    _configured(sub, "generate", GenerateConfig, "hard negatives by adversarial paraphrasing into a pairs file",
                cmd_generate)
    trainer = _configured(sub, "train", TrainConfig, "train a CP (or baseline) LoRA adapter", cmd_train)
    trainer.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    exporter = sub.add_parser("export", help="a run's adapter merged into its base model (--merge), or the adapter "
                                             "alone, as a folder any tool loads")
    exporter.add_argument("run_dir", help="a training run folder (with adapter/), a run of `cpwb run`, or an adapter")
    exporter.add_argument("out", help="the folder to write")
    exporter.add_argument("--merge", action="store_true", help="merge into the base model: a safetensors model folder "
                                                                "with its tokenizer, loadable by AutoModelForCausalLM")
    exporter.add_argument("--model", help="the base model, when the run does not record it")
    exporter.set_defaults(func=cmd_export)
    _configured(sub, "evaluate", EvaluateConfig, "evaluation protocols (RTP, ToxiGen, WikiText-2, HellaSwag, PIQA, "
                "...) on one model", cmd_evaluate)

    reporter = sub.add_parser("report", help="report.html of evaluation folders (the first named `base` is the "
                              "baseline of the paired differences)")
    reporter.add_argument("folders", nargs="+", metavar="[NAME=]FOLDER", help="evaluation folders, e.g. base=outputs/"
                          "lee2024/eval-base CP=outputs/lee2024/eval-cp-seed0; a name repeated with other folders of "
                          "the same model (its other presets) adds their protocols to its column")
    reporter.add_argument("--out", required=True, help="the report.html to write (figures/ beside it)")
    reporter.add_argument("--title", help="the page title")
    reporter.set_defaults(func=cmd_report)

    rescorer = sub.add_parser("rescore", help="score evaluation folders' continuations again with another toxicity "
                              "scorer (a column each, figures in metrics.json, agreement in the report)")
    rescorer.add_argument("folders", nargs="+", help="evaluation folders (`cpwb evaluate` output_dir), or sweep "
                          "points / tuning trials (folders with a result.json)")
    rescorer.add_argument("--scorer", required=True, help="default, bilstm-toxblock, bilstm-tcc, detoxify or "
                          "hf:FOLDER (any AutoModelForSequenceClassification folder)")
    rescorer.add_argument("--batch-size", type=int, default=64, help="texts per batch (default 64)")
    _param_option(rescorer, "a scorer option, e.g. label=toxic, checkpoint=FILE, huggingface_config_path=DIR")
    rescorer.set_defaults(func=cmd_rescore)

    sweeper = sub.add_parser("sweep", help="run a parameter grid (points through papermill) into one results.csv",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="Settings of every point (-p, a grid's base and variations):\nTrainConfig\n"
                             + settings_help(TrainConfig) + "\nQuickEvalConfig\n" + settings_help(QuickEvalConfig))
    sweeper.add_argument("grid", help="grid YAML file (see configs/ablations.yaml)")
    sweeper.add_argument("--only", metavar="PATTERN", action="append",
                         help="run only points whose id contains PATTERN (wildcards ok; repeat for several)")
    sweeper.add_argument("--dry-run", action="store_true",
                         help="list the points, each marked done or to run (from the result.json in its folder), "
                              "and their count; run nothing")
    sweeper.add_argument("--jobs", type=int, default=1, help="points run at once, each in its own kernel (default 1)")
    sweeper.add_argument("--output-root", default="outputs/sweeps", help="where sweeps go (default outputs/sweeps)")
    sweeper.add_argument("--results-only", action="store_true", help="rewrite results.csv from the points' "
                         "result.json files (e.g. after `cpwb rescore`), run nothing")
    sweeper.add_argument("--downstream", type=int, metavar="N", help="run nothing new: measure the downstream "
                         "accuracy change (N HellaSwag and N PIQA items) of completed points that lack it, from "
                         "their saved artefacts, then rewrite results.csv")
    _param_option(sweeper, "override a base setting of every point")
    from cpwb.app.grid_study import GridStorage

    add_setting_options(sweeper, GridStorage)
    sweeper.set_defaults(func=cmd_sweep)

    from cpwb.app.study import StudySpec

    tuner = sub.add_parser("tune", help="an Optuna study of one method's settings (toxicity vs perplexity), one or "
                           "many workers over one storage", formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Study file settings (StudySpec; see configs/tuning/):\n" + settings_help(StudySpec))
    tuner.add_argument("study", help="study YAML file (see configs/tuning/cp.yaml)")
    tuner.add_argument("--storage", help="Optuna storage URL, overriding the study file's (e.g. "
                       "postgresql://user@host/db or journal:///shared/dir/study.log for workers on several machines)")
    tuner.add_argument("--jobs", type=int, default=1, help="local worker processes, the cores shared out (default 1)")
    tuner.add_argument("--worker-index", type=int, help="this worker's index (seeds its sampler); give workers on "
                       "other machines distinct ones (default: 0, or drawn when trials are already running)")
    tuner.add_argument("--output-root", default="outputs/tuning", help="where studies go (default outputs/tuning)")
    tuner.add_argument("--dry-run", action="store_true",
                       help="check the study and its storage, list the space and say where the study stands")
    tuner.add_argument("--confirm", action="store_true", help="after the study: re-run each method's best trial at "
                       "<= 2%% and <= 5%% perplexity cost on the study's confirm_seeds (a sweep in <study>/confirm/)")
    _param_option(tuner, "override a study-file setting (e.g. trials=4)")
    tuner.set_defaults(func=cmd_tune)

    sub.add_parser("bench", help="time the CP training step, naive vs cpwb path; `cpwb bench --help` for options")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command, turning cpwb's own errors into one clear line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are cpwb.app.bench's own
        from cpwb.app.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CpwbError as err:
        print(f"cpwb {args.command}: error: {err}", file=sys.stderr)
        return 2
