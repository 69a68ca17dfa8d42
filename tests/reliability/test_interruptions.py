"""Interruptions: real `kill -9` of training, generation, a notebook sweep, a conversion and a writer loses nothing.

Each job runs in its own process group (tests/reliability/driver.py or the `cpwb` CLI), reaches a known point,
announces it with a marker file and is killed with SIGKILL there; the test then resumes and compares with an
uninterrupted run. A static scan checks that every writer in cpwb goes through cpwb.core.files' atomic helpers.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from safetensors.torch import load_file

from cpwb.app.runner import RunConfig, run_notebooks
from cpwb.core.config import from_dict
from cpwb.core.files import sha256_file
from cpwb.data.pairs import PairRecord, PairText, read_pairs, validate_pairs_file, write_pairs
from cpwb.engine import assets
from cpwb.steps.negatives.anchors import load_anchors
from cpwb.steps.negatives.run import LOG_FILE, PAIRS_FILE, run_generation
from cpwb.steps.training.checkpoints import latest_checkpoint
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train
from tests.reliability.driver import generation_config, tiny_generation_models
from tests.reliability.jobs import job_args, train_settings
from tests.reliability.source_scan import constant, package_calls

# ------------------------------------------------------------------------------------------------ training


@pytest.mark.fault(2)
def test_training_killed_mid_step_and_mid_checkpoint_resumes_to_the_uninterrupted_adapter(
        tiny_model_dir, pairs_file, tmp_path, start_job, one_thread):
    killed = tmp_path / "killed"
    settings = train_settings(tiny_model_dir, pairs_file, killed)
    job = start_job("train", job_args(settings=settings, hang_after_checkpoint=2, marker=tmp_path / "m1"))
    job.wait_for(tmp_path / "m1")
    job.kill()  # inside step 3
    assert latest_checkpoint(killed).name == "step-000002"
    assert not (killed / "adapter").exists()

    job = start_job("train", job_args(settings=settings, resume=True, hang_writing_checkpoint=4,
                                      marker=tmp_path / "m2"))
    job.wait_for(tmp_path / "m2")
    job.kill()  # half of step 4's trainer state on disk, in the checkpoint's temporary folder
    assert [p.name for p in (killed / "checkpoints").glob("step-*")] == ["step-000002"]
    assert any(p.name.startswith(".step-000004") for p in (killed / "checkpoints").iterdir())
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    resumed = train(from_dict(TrainConfig, settings), resume=True)
    straight = train(from_dict(TrainConfig, {**settings, "output_dir": str(tmp_path / "straight")}))
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [m["step"] for m in resumed.metrics] == list(range(1, 7))
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 7))
    assert [round(m["loss"], 6) for m in resumed.metrics] == [round(m["loss"], 6) for m in straight.metrics]


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.fault(2)
def test_generation_killed_between_anchors_and_mid_append_loses_and_repeats_no_anchor(
        tiny_model_dir, tmp_path, start_job, one_thread):
    killed = tmp_path / "killed"
    job = start_job("generate", job_args(model_dir=tiny_model_dir, output_dir=killed, hang_after_anchors=3,
                                         marker=tmp_path / "m1"))
    job.wait_for(tmp_path / "m1")
    job.kill()
    anchors = [a.id for a in load_anchors(generation_config(killed))]
    logged = [json.loads(line)["id"] for line in (killed / LOG_FILE).read_text().splitlines()]
    assert logged == anchors[:3]

    job = start_job("generate", job_args(model_dir=tiny_model_dir, output_dir=killed, tear_pair_line=True,
                                         marker=tmp_path / "m2"))
    job.wait_for(tmp_path / "m2")
    job.kill()
    assert not (killed / PAIRS_FILE).read_bytes().endswith(b"\n")  # a torn pair line

    models = tiny_generation_models(tiny_model_dir)
    run_generation(generation_config(killed), models)
    run_generation(generation_config(tmp_path / "whole"), models)
    logged = [json.loads(line)["id"] for line in (killed / LOG_FILE).read_text().splitlines()]
    assert logged == anchors  # each anchor once, in order
    assert validate_pairs_file(killed / PAIRS_FILE) == []
    kept = [r.id for r in read_pairs(killed / PAIRS_FILE)]
    assert kept and len(kept) == len(set(kept))
    for name in (PAIRS_FILE, LOG_FILE):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


# ------------------------------------------------------------------------------------------------ sweep


def notebook(folder: Path, name: str, body: str) -> None:
    """A notebook with a `run_dir` parameter that counts its executions in run_dir/<name>.runs, then runs `body`."""
    book = nbformat.v4.new_notebook()
    count = (f"from pathlib import Path\nruns = Path(run_dir) / '{name}.runs'\n"
             "runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))")
    book.cells = [nbformat.v4.new_code_cell("run_dir = ''", metadata={"tags": ["parameters"]}),
                  nbformat.v4.new_code_cell(count), nbformat.v4.new_code_cell(body)]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, folder / f"{name}.ipynb")


@pytest.mark.fault
def test_sweep_killed_mid_notebook_keeps_finished_notebooks_and_redoes_the_killed_one(tmp_path, start_job):
    books = tmp_path / "books"
    books.mkdir()
    notebook(books, "00_first", "x = 1")
    notebook(books, "01_sleepy", "if runs.read_text() == '1':\n    (Path(run_dir) / 'started').write_text('')\n"
                                 "    import time\n    time.sleep(3600)")
    notebook(books, "02_last", "y = 2")
    settings = {"notebook_dir": str(books), "output_root": str(tmp_path / "out"), "run_id": "sweep"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "out" / "sweep"
    job = start_job("run", "--config", str(tmp_path / "run.yaml"), module="cpwb")
    job.wait_for(run_dir / "started")
    job.kill()  # the CLI and its kernel, mid-notebook
    record = json.loads((run_dir / "run.json").read_text())
    assert {name: v["status"] for name, v in record["notebooks"].items()} == {"00_first.ipynb": "completed"}

    _, results = run_notebooks(from_dict(RunConfig, settings))
    assert [(r.notebook, r.status) for r in results] == [
        ("00_first.ipynb", "skipped"), ("01_sleepy.ipynb", "completed"), ("02_last.ipynb", "completed")]
    runs = {name: (run_dir / f"{name}.runs").read_text() for name in ("00_first", "01_sleepy", "02_last")}
    assert runs == {"00_first": "1", "01_sleepy": "2", "02_last": "1"}


@pytest.mark.fault
def test_grid_sweep_killed_mid_point_keeps_finished_points_and_redoes_the_killed_one(tmp_path, start_job):
    from cpwb.app.sweep import load_grid, run_grid

    point = nbformat.v4.new_notebook()  # a stand-in for the train-and-evaluate point notebook
    point.cells = [nbformat.v4.new_code_cell("output_dir = ''\ntau = 0.5", metadata={"tags": ["parameters"]}),
                   nbformat.v4.new_code_cell(
                       "import json, time\nfrom pathlib import Path\nruns = Path(output_dir) / 'runs'\n"
                       "runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))\n"
                       "if tau == 0.1 and runs.read_text() == '1':\n"
                       "    (Path(output_dir).parent / 'started').write_text('')\n    time.sleep(3600)\n"
                       "(Path(output_dir) / 'result.json').write_text(json.dumps({'phi_gap': tau}))")]
    point.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(point, tmp_path / "point.ipynb")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "g", "notebook": str(tmp_path / "point.ipynb"),
                                         "one_at_a_time": {"tau": [0.1, 0.2]}}))
    out = tmp_path / "out"
    job = start_job("sweep", str(grid_file), "--output-root", str(out), module="cpwb")
    job.wait_for(out / "g" / "started")
    job.kill()
    assert (out / "g" / "base__seed=0" / "result.json").is_file()
    assert not (out / "g" / "tau=0.1__seed=0" / "result.json").exists()

    results = run_grid(load_grid(grid_file), output_root=out, progress=False)
    rows = {row["point"]: row for row in csv.DictReader(results.open())}
    assert {p: r["status"] for p, r in rows.items()} == {"base__seed=0": "completed", "tau=0.1__seed=0": "completed",
                                                         "tau=0.2__seed=0": "completed"}
    runs = {p: (out / "g" / p / "runs").read_text() for p in rows}
    assert runs == {"base__seed=0": "1", "tau=0.1__seed=0": "2", "tau=0.2__seed=0": "1"}


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))  # for this process and the jobs it starts
    return tmp_path / "cache"


def counting_build(calls: list):
    def build(out: Path) -> None:
        calls.append(1)
        (out / "weights.bin").write_bytes(b"the real weights")
        (out / "config.json").write_text("{}")
    return build


@pytest.mark.fault
def test_conversion_killed_mid_build_leaves_no_cache_that_is_ever_used(cache, tmp_path, start_job):
    source = tmp_path / "source.bin"
    source.write_bytes(b"v1")
    job = start_job("convert", job_args(name="thing", source=source, marker=tmp_path / "m"))
    job.wait_for(tmp_path / "m")
    job.kill()
    assert not (cache / "thing").exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".thing.")]  # the killed build's temporary
    calls: list = []
    folder = assets.cached_conversion("thing", source, counting_build(calls))
    assert calls == [1] and (folder / "weights.bin").read_bytes() == b"the real weights"


TAMPERING = {
    "weights modified": lambda f: (f / "weights.bin").write_bytes(b"evil weights!!!!"),
    "weights truncated": lambda f: (f / "weights.bin").write_bytes(b""),
    "weights deleted": lambda f: (f / "weights.bin").unlink(),
    "manifest deleted": lambda f: (f / assets.MANIFEST).unlink(),
    "manifest not JSON": lambda f: (f / assets.MANIFEST).write_text("{"),
    "manifest checksum changed": lambda f: (f / assets.MANIFEST).write_text(
        (f / assets.MANIFEST).read_text().replace(sha256_file(f / "weights.bin"), "0" * 64)),
    "file added": lambda f: (f / "modeling_evil.py").write_text("import os\n"),
}


@pytest.mark.fault
@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
def test_tampered_cache_is_rebuilt_not_used(cache, tmp_path, tamper):
    source = tmp_path / "source.bin"
    source.write_bytes(b"v1")
    calls: list = []
    folder = assets.cached_conversion("thing", source, counting_build(calls))
    tamper(folder)
    assert assets.cached_conversion("thing", source, counting_build(calls)) == folder and calls == [1, 1]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["weights.bin", "config.json", assets.MANIFEST])
    assert (folder / "weights.bin").read_bytes() == b"the real weights"


@pytest.mark.fault
def test_write_pairs_killed_mid_stream_leaves_the_previous_file(tmp_path, start_job):
    path = write_pairs(tmp_path / "pairs.jsonl", [PairRecord("old", "a", (PairText("p", "human"),),
                                                             (PairText("n", "human"),))])
    before = path.read_bytes()
    job = start_job("write_pairs", job_args(path=path, n=5000, marker=tmp_path / "m"))
    job.wait_for(tmp_path / "m")
    job.kill()
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------------ one writer

# (module, function) -> why a direct write there is safe.
ATOMIC_EXCEPTIONS = {
    ("core.files", "append_jsonl"): "fsynced one-line appends, the unit of progress of resumable jobs; readers drop a "
                               "torn last line (read_jsonl_tolerant, read_pairs_tolerant)",
    ("data.pairs", "_seal_tail"): "cuts a torn last line of an append-only file before the next append (fsynced)",
    ("engine.assets", "_convert_gguf_lm"): "a cached_conversion build: writes into its temporary folder",
    ("engine.bilstm", "convert"): "a cached_conversion build: writes into its temporary folder",
    ("engine.bilstm", "KerasTokenizer.save"): "called only by convert, into cached_conversion's temporary folder",
    ("engine.embeddings", "_save"): "np.save into an in-memory buffer, then atomic_write_bytes",
    ("steps.evaluation.parallel", "_child"): "the child's live log (its output as it comes, for a reader following "
                                             "the run); the child's protocol records, written atomically, are what "
                                             "mark its work done",
    ("steps.training.editing", "fit_intervention"): "Intervention.save writes its whole folder through atomic_path",
    ("app.tune", "run_workers"): "each local worker's live log (its output as it comes); the study's storage, "
                                 "transactional, is what marks trials done",
    ("app.runner", "execute_notebook"): "papermill writes the executed copy cell by cell on purpose (a failed or "
                                   "killed notebook's partial output is kept); run.json, written atomically, is what "
                                   "marks a notebook completed",
}
WRITER_METHODS = {"write_text", "write_bytes", "save_pretrained", "save_file", "save", "to_parquet", "write_html",
                  "write_image", "symlink_to", "hardlink_to", "touch"}
WRITER_FUNCTIONS = {"torch.save", "np.save", "np.savez", "np.savez_compressed", "shutil.copy", "shutil.copy2",
                    "shutil.copyfile", "shutil.copytree", "shutil.move", "papermill.execute_notebook"}


def is_writer(call) -> bool:
    """Whether a call writes a file: writer functions and methods, `open` in a writing mode, to_csv/to_json to a
    path."""
    method = call.name.rsplit(".", 1)[-1]
    if method == "open":
        mode = call.keyword("mode")
        if mode is None:
            position = 1 if call.name == "open" else 0  # open(path, mode) or path.open(mode)
            mode = call.node.args[position] if len(call.node.args) > position else None
        return any(flag in str(constant(mode) or "r") for flag in "wax+")
    if method in ("to_csv", "to_json"):
        return bool(call.node.args) or call.keyword("path_or_buf") is not None
    return method in WRITER_METHODS or call.name in WRITER_FUNCTIONS


def test_every_writer_in_cpwb_goes_through_the_atomic_helper():
    writers = [c for c in package_calls() if is_writer(c)]
    direct = [c for c in writers if not c.in_atomic_block]
    assert len(writers) - len(direct) >= 5  # the scan sees the writes inside atomic_path blocks
    offenders = [c.where for c in direct if (c.module, c.function) not in ATOMIC_EXCEPTIONS]
    assert offenders == [], "write through cpwb.core.files (atomic_path / atomic_write_*), or justify the exception"
    assert set(ATOMIC_EXCEPTIONS) == {(c.module, c.function) for c in direct}, "stale exceptions"
