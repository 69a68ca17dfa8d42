"""Execute the ordered notebooks headlessly with papermill into a run folder, resumably.

A run folder `outputs/<run-id>/` records its resolved parameters and each notebook's status in `run.json`.
A notebook already completed with the same file contents and parameters is skipped on re-run; execution stops at
the first failing notebook, whose partially executed copy is kept beside the others.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpwb import __version__
from cpwb.core.config import require
from cpwb.core.errors import ConfigError, CpwbError
from cpwb.core.files import atomic_write_json, sha256_file
from cpwb.core.provenance import REPO_ROOT, digest
from cpwb.core.settings import setting

NOTEBOOK_DIR = REPO_ROOT / "notebooks"

@dataclass
class RunConfig:
    """What `cpwb run` executes: which notebooks, with which parameters, into which folder."""

    notebooks: list[str] = setting([], "notebook names or numbers (e.g. 02 or 02_cp_training); empty: every NN_*.ipynb")
    parameters: dict[str, Any] = setting({}, "passed to each notebook that declares them (type-checked first)")
    run_id: str | None = setting(None, "folder name under output_root; null: derived from the notebooks and "
                                       "parameters, so the same command resumes the same folder")
    output_root: str = setting("outputs", "where run folders go")
    kernel: str = setting("python3", "Jupyter kernel that executes the notebooks (its name in `jupyter "
                                     "kernelspec list`)")
    force: bool = setting(False, "re-execute notebooks already completed")
    notebook_dir: str | None = setting(None, "folder of the notebooks; null: the project's notebooks/")
    progress: bool = setting(False, "papermill's bar over each notebook's cells")

    def __post_init__(self) -> None:
        require(self.run_id is None or (self.run_id and "/" not in self.run_id), "run_id",
                "must be a non-empty folder name without '/'")


def ordered_notebooks(names: list[str] | None = None, folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The workbench notebooks in order (all `NN_*.ipynb`, or the named ones), failing on unknown names."""
    available = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return available
    by_name = {p.stem: p for p in available} | {p.stem[:2]: p for p in available}
    missing = [n for n in names if n.removesuffix(".ipynb") not in by_name]
    if missing:
        raise ConfigError(f"unknown notebook(s) {missing}; available: {[p.stem for p in available]}",
                          field="notebooks")
    return [by_name[n.removesuffix(".ipynb")] for n in names]


def declared_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook's `parameters` cell declares, with papermill's inferred types and defaults."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def _default_value(text: str) -> Any:
    """A parameters-cell default as a Python value, or None when it is not a literal."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def select_parameters(notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """The subset of `parameters` the notebook declares, type-checked against the type of each default."""
    declared = declared_parameters(notebook)
    chosen = {}
    for name, value in parameters.items():
        if name not in declared:
            continue
        default = _default_value(declared[name]["default"])
        expected: tuple[type, ...] = (int, float) if type(default) is float else (type(default),)
        wrong = default is not None and value is not None and (
            not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool))
        if wrong:
            raise ConfigError(f"expected {type(default).__name__} (default {declared[name]['default']}), "
                              f"got {type(value).__name__} {value!r}", notebook.name, field=name)
        chosen[name] = value
    return chosen


def default_run_id(notebooks: list[Path], parameters: dict[str, Any]) -> str:
    """A run id derived from what runs, so the same command resumes the same folder."""
    return f"run-{digest({'notebooks': [p.name for p in notebooks], 'parameters': parameters}, 10)}"


@dataclass
class NotebookResult:
    """Outcome of one notebook in a run."""

    notebook: str
    output: str
    status: str  # completed | skipped | failed
    seconds: float
    error: str | None = None


def _kernel_manager_class():
    """A Jupyter kernel manager whose kernels talk over IPC sockets in a private temporary folder.

    Over IPC the kernel does not warn that it is "running over TCP without encryption" at every start, and kernels
    started at once (sweep points run in parallel) cannot race for the same ports.
    """
    from jupyter_client.manager import AsyncKernelManager

    class PrivateIPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            folder = tempfile.mkdtemp(prefix="cpwb-kernel-")
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(folder, "kernel"))
            super().__init__(**kwargs)
            weakref.finalize(self, shutil.rmtree, folder, True)

    return PrivateIPCKernelManager


def execute_notebook(notebook: Path, output: Path, parameters: dict[str, Any], cwd: Path,
                     kernel: str = "python3", progress: bool = False) -> None:
    """Run one notebook with papermill; the executed copy is written as it goes. `progress`: a bar over its cells."""
    import papermill

    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel,
                               log_output=False, progress_bar=progress, cwd=str(cwd),
                               kernel_manager_class=_kernel_manager_class())


def run_notebooks(config: RunConfig, say: Callable[[str], None] | None = None) -> tuple[Path, list[NotebookResult]]:
    """Execute the configured notebooks in order into `<output_root>/<run_id>/`; returns the folder and results.

    `say` receives one line as each notebook starts and one as it ends (or is skipped), with its output path.
    """
    say = say or (lambda line: None)
    folder = Path(config.notebook_dir) if config.notebook_dir else NOTEBOOK_DIR
    notebooks = ordered_notebooks(config.notebooks, folder)
    selected = {nb.name: select_parameters(nb, config.parameters) for nb in notebooks}
    run_id = config.run_id or default_run_id(notebooks, config.parameters)
    run_dir = (Path(config.output_root) if Path(config.output_root).is_absolute()
               else REPO_ROOT / config.output_root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path = run_dir / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    done = record.get("notebooks", {})
    results = []
    for number, nb in enumerate(notebooks, start=1):
        step = f"[{number}/{len(notebooks)}] {nb.name}"
        params = {**selected[nb.name]}
        if "run_dir" in declared_parameters(nb):
            params["run_dir"] = str(run_dir)
        key = digest({"file": sha256_file(nb), "parameters": params}, 10)
        output = run_dir / nb.name
        previous = done.get(nb.name, {})
        if not config.force and previous.get("status") == "completed" and previous.get("key") == key \
                and output.is_file():
            results.append(NotebookResult(nb.name, str(output), "skipped", 0.0))
            say(f"{step}: already completed with these parameters, skipped ({output})")
            continue
        say(f"{step}: started, executed copy in {output}")
        started = time.time()
        try:
            execute_notebook(nb, output, params, cwd=folder, kernel=config.kernel, progress=config.progress)
            result = NotebookResult(nb.name, str(output), "completed", time.time() - started)
        except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
            result = NotebookResult(nb.name, str(output), "failed", time.time() - started,
                                    f"{type(err).__name__}: {err}")
        say(f"{step}: {result.status} in {result.seconds:.0f} s")
        results.append(result)
        done[nb.name] = {"status": result.status, "key": key, "parameters": params, "seconds": result.seconds,
                         "error": result.error}
        atomic_write_json(record_path, {"run_id": run_id, "cpwb_version": __version__,
                                        "parameters": config.parameters, "notebooks": done})
        if result.status == "failed":
            break
    return run_dir, results


def raise_on_failure(results: list[NotebookResult]) -> None:
    """Raise naming the failed notebook, its kept partial output and its error."""
    for result in results:
        if result.status == "failed":
            raise CpwbError(f"notebook {result.notebook} failed (partial output kept at {result.output}):\n"
                            f"{result.error}")
