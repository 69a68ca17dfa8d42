"""Killable jobs for the reliability tests, and the small training run they share."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Guards against a hung job, not timing assertions.
MARKER_WAIT_S = 600
FINISH_WAIT_S = 3600


def job_args(**args) -> str:
    """Keyword arguments as the JSON argument of a driver scenario (paths as strings)."""
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in args.items()})


def train_settings(model_dir: Path, pairs: Path, output_dir: Path, **changes) -> dict:
    """A six-step tiny training run checkpointed every two steps (dropout on, so RNG state matters on resume)."""
    return {"model": str(model_dir), "pairs": str(pairs), "holdout_fraction": 0.0, "steps": 6, "anchors_per_step": 2,
            "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "output_dir": str(output_dir), "progress": False, **changes}


def driver_env() -> dict[str, str]:
    """Environment of a driver process: one thread (deterministic and fair on a shared CPU), offline, repo
    importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


class Job:
    """A process group started for the test, to be killed with SIGKILL like a scheduler kills a job."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"job-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen(args, cwd=REPO, env=driver_env(), stdout=handle, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_for(self, marker: Path) -> None:
        """Block until `marker` exists; fail with the job's log if the job ends first."""
        deadline = time.monotonic() + MARKER_WAIT_S
        while not marker.exists():
            if self.process.poll() is not None:
                pytest.fail(f"job ended (rc {self.process.returncode}) before {marker.name}:\n"
                            f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"job never reached {marker.name}:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 the whole process group (a papermill kernel too) and reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def finish(self) -> str:
        """Wait for a normal exit, failing with the log unless it succeeded; the log."""
        self.process.wait(timeout=FINISH_WAIT_S)
        text = self.log.read_text(errors="replace")
        assert self.process.returncode == 0, text[-3000:]
        return text
