"""Bad input: every case is refused with one short line naming file, line and field, and nothing is written.

Pairs files go through every consumer (the validator, `cpwb validate-pairs`, the streaming reader and training);
configs through `cpwb train|generate|run` and the sweep; notebook parameters through cpwb.app.runner.
tests/test_pairs.py holds the reader's own unit cases; they are replayed here through the consumers, with more
cases added.
"""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from cpwb.app.cli import main as cpwb
from cpwb.app.runner import RunConfig, run_notebooks
from cpwb.core.config import from_dict
from cpwb.core.errors import AssetError, ConfigError, InputError
from cpwb.data.pairs import read_pairs, validate_pairs_file
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train
from tests.test_pairs import CASES as READER_CASES
from tests.test_pairs import good, write_lines

MAX_MESSAGE = 1000  # characters: one line, which may list the valid choices but never echoes a 1 MB value


def one_line(message: str) -> str:
    """The message, checked to be one short line."""
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message[:500]
    return message


def no_files(folder: Path) -> bool:
    """Nothing was written under `folder` (it may not exist, or be an empty directory)."""
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------ pairs files

TEXT = {"text": "fine", "source": "human"}
MORE_CASES: dict[str, tuple[Any, int, str | None, str]] = {
    "id wrong type": (good("x", id=5), 2, "id", "expected a string, got number"),
    "schema_version a string": (good("x", schema_version="1"), 2, "schema_version", "unknown schema_version '1'"),
    "group wrong type": (good("x", group=3), 2, "group", "expected a string or null, got number"),
    "meta wrong type": (good("x", meta=[]), 2, "meta", "expected an object, got array"),
    "text wrong type": (good("x", positives=[{"text": ["a"], "source": "human"}]), 2, "positives[0].text",
                        "expected a string, got array"),
    "positive not an object": (good("x", positives=["fine"]), 2, "positives[0]", "expected an object, got string"),
    "negatives an object": (good("x", negatives=TEXT), 2, "negatives", "expected an array, got object"),
    "score NaN": (good("x", negatives=[{**TEXT, "scores": {"toxicity": float("nan")}}]), 2,
                  "negatives[0].scores.toxicity", "expected a finite number, got nan"),
    "score boolean": (good("x", negatives=[{**TEXT, "scores": {"toxicity": True}}]), 2,
                      "negatives[0].scores.toxicity", "expected a finite number, got True"),
    "newline-and-tab-only anchor": (good("x", anchor="\n\t \r"), 2, "anchor", "empty or whitespace-only"),
    "unicode-space-only positive": (good("x", positives=[{"text": "\u00a0\u2003\u3000", "source": "human"}]), 2,
                                    "positives[0].text", "empty or whitespace-only"),
    "lone surrogate in a text": (good("x", negatives=[{"text": "you \ud800", "source": "human"}]), 2,
                                 "negatives[0].text", "not valid Unicode"),
    "empty id": (good("x", id=""), 2, "id", "empty or whitespace-only"),
    "null anchor": (good("x", anchor=None), 2, "anchor", "expected a string, got null"),
    "truncated UTF-8 sequence": (b'{"id": "caf\xc3"}', 2, None, "invalid UTF-8"),
    "UTF-16 line": (json.dumps(good("x")).encode("utf-16"), 2, None, "invalid UTF-8"),
    "byte-order mark": (b"\xef\xbb\xbf" + json.dumps(good("x")).encode(), 2, None,
                        "invalid JSON: Unexpected UTF-8 BOM"),
    "nested 100k deep": ("[" * 100_000, 2, None, "invalid JSON: nested too deeply"),
    "5000-digit number": ('{"schema_version": 1' + "0" * 5000 + "}", 2, None, "invalid JSON: Exceeds the limit"),
    "1 MB anchor": (good("x", anchor="a" * 1_000_001), 2, "anchor",
                    "text is 1,000,001 bytes, over the limit of 1,000,000"),
    "1 MB bad source value": (good("x", negatives=[{"text": "t", "source": "s" * 1_000_000}]), 2,
                              "negatives[0].source", "expected one of ['generated', 'human', 'anchor'], got 'sss"),
    "1 MB duplicate id": (good("i" * 999_000), 2, "id", "duplicate id 'iii"),
    "python literal instead of JSON": ("{'schema_version': 1}", 2, None, "invalid JSON"),
    "trailing comma": ('{"schema_version": 1, "id": "x",}', 2, None, "invalid JSON"),
}
PAIRS_CASES = {**READER_CASES, **MORE_CASES}


def bad_pairs_file(folder: Path, bad: Any) -> Path:
    """Line 1 a valid record, line 2 the bad one, line 3 valid again (a duplicate-id case reuses line 1's id)."""
    first = good("i" * 999_000) if bad == PAIRS_CASES["1 MB duplicate id"][0] else good("r1")
    return write_lines(folder / "pairs.jsonl", first, bad, good("r3"))


@pytest.mark.bad_input  # each case goes through four consumers: validator, CLI, reader, trainer
@pytest.mark.parametrize("bad, line, field, message", PAIRS_CASES.values(), ids=PAIRS_CASES.keys())
def test_bad_pairs_line_is_refused_by_every_consumer_with_one_line_and_nothing_written(
        tmp_path, capsys, tiny_model_dir, bad, line, field, message):
    path = bad_pairs_file(tmp_path, bad)
    expected = f"{path}:{line}: " + (f"{field}: " if field else "") + message
    problems = validate_pairs_file(path)
    assert len(problems) == 1 and one_line(problems[0]).startswith(expected), problems[0][:400]

    assert cpwb(["validate-pairs", str(path)]) == 1
    assert capsys.readouterr().err == problems[0] + "\n"

    with pytest.raises(InputError) as error:
        list(read_pairs(path))
    assert str(error.value) == problems[0] and (error.value.line, error.value.field) == (line, field)

    out = tmp_path / "run"
    with pytest.raises(InputError) as error:
        train(from_dict(TrainConfig, {"model": str(tiny_model_dir), "pairs": str(path), "output_dir": str(out)}))
    assert str(error.value) == problems[0] and no_files(out)


@pytest.mark.bad_input
def test_a_text_of_exactly_the_limit_passes_one_byte_more_fails(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", good("r1", anchor="é" * 500_000))  # 1,000,000 bytes of UTF-8
    assert validate_pairs_file(path) == [] and len(next(read_pairs(path)).anchor) == 500_000
    write_lines(path, good("r1", anchor="é" * 500_000 + "!"))
    assert [one_line(p) for p in validate_pairs_file(path)] == [
        f"{path}:1: anchor: text is 1,000,001 bytes, over the limit of 1,000,000 (max_text_bytes)"]


@pytest.mark.bad_input
def test_a_100k_line_file_is_validated_streaming_and_its_one_bad_line_found(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for i in range(99_999):
            handle.write(json.dumps({"schema_version": 1, "id": f"r{i}", "anchor": f"anchor {i}",
                                     "positives": [{"text": f"pos {i}", "source": "human"}],
                                     "negatives": [{"text": f"neg {i}", "source": "human"}]}) + "\n")
        handle.write(json.dumps(good("r5", positives=[])) + "\n")  # line 100,000: no positives, and a duplicate id
    size = path.stat().st_size
    tracemalloc.start()
    try:
        problems = validate_pairs_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [one_line(p) for p in problems] == [
        f"{path}:100000: positives: anchor has no positives; every record needs at least one",
        f"{path}:100000: id: duplicate id 'r5' (first on line 6)"]
    # One line at a time plus the ids seen so far (for duplicates, ~130 bytes each); the parsed records of this
    # file take about 100 MiB (tracemalloc peak of list(read_pairs(...)) over its 99,999 good lines).
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


# ------------------------------------------------------------------------------------------------ configs

TRAIN_CASES: dict[str, tuple[str, str, str]] = {
    "unknown key": ("taux: 1.0", "taux", "unknown setting(s) ['taux']"),
    "tau zero": ("tau: 0", "tau", "must be > 0"),
    "tau negative": ("tau: -0.5", "tau", "must be > 0"),
    "tau infinite": ("tau: .inf", "tau", "must be a finite number > 0"),
    "tau NaN": ("tau: .nan", "tau", "must be > 0"),
    "alpha negative": ("alpha: -1", "alpha", "must be >= 0"),
    "alpha infinite": ("alpha: .inf", "alpha", "must be a finite number >= 0"),
    "|P| = 0": ("max_positives: 0", "max_positives", "must be >= 1"),
    "|N| = 0": ("max_negatives: 0", "max_negatives", "must be >= 1"),
    "missing pairs file": ("pairs: /no/such/pairs.jsonl", "pairs", "file not found"),
    "steps wrong type": ("steps: ten", "steps", "expected int"),
    "steps boolean": ("steps: true", "steps", "expected int"),
    "lr wrong type": ("lr: fast", "lr", "expected float"),
    "target_modules not a list": ("target_modules: q_proj", "target_modules", "expected a list"),
    "objective unknown": ("objective: ppo", "objective", "must be one of"),
    "holdout fraction 1": ("holdout_fraction: 1.0", "holdout_fraction", "must be in [0, 1)"),
}


def train_yaml(folder: Path, model_dir: Path, pairs: Path, case: str) -> Path:
    """A train config file: a valid tiny run with the case's lines replacing its settings."""
    base = {"model": str(model_dir), "pairs": str(pairs), "output_dir": str(folder / "run"), "steps": 2}
    changed = yaml.safe_load(case)
    text = yaml.safe_dump({k: v for k, v in base.items() if k not in changed}) + case + "\n"
    (folder / "train.yaml").write_text(text)
    return folder / "train.yaml"


def cli_error(capsys, argv: list[str]) -> str:
    """Run `cpwb ARGV`, expecting exit code 2 and exactly one line on stderr; that line."""
    assert cpwb(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err[:1000]
    return one_line(err.rstrip("\n"))


@pytest.mark.bad_input
@pytest.mark.parametrize("case, field, message", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_bad_train_setting_is_named_with_its_file_and_nothing_written(
        tmp_path, capsys, tiny_model_dir, pairs_file, case, field, message):
    path = train_yaml(tmp_path, tiny_model_dir, pairs_file, case)
    line = cli_error(capsys, ["train", "--config", str(path)])
    assert line.startswith(f"cpwb train: error: {path}: {field}: ") and message in line
    assert not (tmp_path / "run").exists()


WHOLE_FILE_CASES = {
    "not a mapping": ("- tau\n- alpha\n", "expected a mapping of settings"),
    "YAML syntax error": ("tau: [1, 2\n", "not valid YAML"),
    "config file missing": (None, "config file not found"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("text, message", WHOLE_FILE_CASES.values(), ids=WHOLE_FILE_CASES.keys())
def test_unreadable_config_file_is_reported_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "train.yaml"
    if text is not None:
        path.write_text(text)
    line = cli_error(capsys, ["train", "--config", str(path)])
    assert line.startswith(f"cpwb train: error: {path}") and message in line


def test_unknown_model_lists_the_embedded_defaults_in_one_line_and_writes_nothing(tmp_path, capsys, pairs_file):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": "no-such-org/no-such-model", "pairs": str(pairs_file),
                                    "output_dir": str(tmp_path / "run")}))
    line = cli_error(capsys, ["train", "--config", str(path)])
    assert "unknown model 'no-such-org/no-such-model'" in line.replace("\n", "")
    assert all(name in line for name in ("smollm2-135m-instruct", "default", "all-minilm-l6-v2"))
    assert no_files(tmp_path / "run")


@pytest.mark.bad_input
def test_unknown_model_message_is_one_line_from_the_library_too():
    from cpwb.engine.assets import load_tokenizer

    with pytest.raises(AssetError) as error:
        load_tokenizer("no-such-org/no-such-model")
    assert "\n" not in str(error.value) and "smollm2-135m-instruct" in str(error.value)


@pytest.mark.bad_input
def test_missing_data_folder_names_the_missing_file_and_writes_nothing(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CPWB_DATA", str(tmp_path / "no-data"))
    with pytest.raises(InputError) as error:
        train(from_dict(TrainConfig, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run")}))
    assert str(tmp_path / "no-data" / "paradetox" / "paradetox.tsv") in one_line(str(error.value))
    assert "missing data file" in str(error.value) and no_files(tmp_path / "run")


@pytest.mark.bad_input(2)
def test_bad_generation_and_run_configs_fail_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump({"n_positives": 0, "output_dir": str(tmp_path / "gen")}))
    line = cli_error(capsys, ["generate", "--config", str(path)])
    assert line.startswith(f"cpwb generate: error: {path}: n_positives: must be >= 1")
    assert not (tmp_path / "gen").exists()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"notebook": "00_tour", "output_root": str(tmp_path / "out")}))
    line = cli_error(capsys, ["run", "--config", str(path)])
    assert line.startswith(f"cpwb run: error: {path}: notebook: unknown setting(s) ['notebook']")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ notebook parameters

PARAMETER_CELL = "count = 1\nratio = 0.5\nflag = True\nname = 'a'\nitems = [1, 2]"
PARAMETER_CASES: dict[str, tuple[str, Any, str]] = {
    "int given a string": ("count", "five", "expected int"),
    "int given a float": ("count", 2.5, "expected int"),
    "int given a boolean": ("count", True, "expected int"),
    "float given a string": ("ratio", "high", "expected float"),
    "bool given an int": ("flag", 1, "expected bool"),
    "str given an int": ("name", 3, "expected str"),
    "list given a string": ("items", "a", "expected list"),
}


@pytest.fixture
def books(tmp_path) -> Path:
    folder = tmp_path / "books"
    folder.mkdir()
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(PARAMETER_CELL, metadata={"tags": ["parameters"]}),
                  nbformat.v4.new_code_cell("(Path := __import__('pathlib').Path)('ran').write_text('')")]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, folder / "00_params.ipynb")
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize("name, value, message", PARAMETER_CASES.values(), ids=PARAMETER_CASES.keys())
def test_notebook_parameter_of_the_wrong_type_is_refused_before_any_notebook_runs(tmp_path, books, name, value,
                                                                                  message):
    config = RunConfig(notebook_dir=str(books), output_root=str(tmp_path / "out"), parameters={name: value})
    with pytest.raises(ConfigError) as error:
        run_notebooks(config)
    assert error.value.field == name and one_line(str(error.value)).startswith(f"00_params.ipynb: {name}: {message}")
    assert not (tmp_path / "out").exists() and not (books / "ran").exists()


@pytest.mark.bad_input
def test_notebook_parameter_of_the_wrong_type_from_the_command_line(tmp_path, capsys, books):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"notebook_dir": str(books), "output_root": str(tmp_path / "out")}))
    line = cli_error(capsys, ["run", "--config", str(path), "-p", "count=five"])
    assert line == "cpwb run: error: 00_params.ipynb: count: expected int (default 1), got str 'five'"
    assert not (tmp_path / "out").exists()


GRID_CASES = {
    "point with tau 0": ({"one_at_a_time": {"tau": [0.0]}}, "tau", "must be > 0"),
    "base setting of the wrong type": ({"base": {"steps": "ten"}}, "steps", "expected int"),
    "unknown setting": ({"base": {"tua": 0.1}}, "tua", "unknown setting"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("changes, field, message", GRID_CASES.values(), ids=GRID_CASES.keys())
def test_bad_grid_point_is_refused_before_any_point_runs(tmp_path, changes, field, message):
    from cpwb.app.sweep import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "g", **changes}))
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    assert error.value.field == field and message in one_line(str(error.value)) and str(path) in str(error.value)
