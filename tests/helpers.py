"""Small helpers several test modules share: a free local port, a fake parameterised notebook."""
from __future__ import annotations

import socket
from pathlib import Path

import nbformat


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_notebook(path: Path, parameters: str, code: str) -> Path:
    """A two-cell notebook at `path`: a `parameters`-tagged cell, then `code`, on the python3 kernel."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell(code)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def kill_worker_mid_execution(worker, executions, kernel_field: int, timeout: float = 120.0) -> list[str]:
    """SIGKILL `worker` (a Popen) once `executions()` lists a started execution (a line whose first field is
    "start"), then wait until that execution's kernel (pid in field `kernel_field`) has exited with it; returns the
    started line."""
    import signal
    import time

    deadline = time.time() + timeout
    while not any(line[0] == "start" for line in executions()):
        assert worker.poll() is None and time.time() < deadline, worker.stdout.read() if worker.stdout else ""
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    started = next(line for line in executions() if line[0] == "start")
    while Path(f"/proc/{started[kernel_field]}").exists():  # the kernel exits with it (ipykernel's parent poller)
        assert time.time() < deadline, "the killed worker's notebook kernel runs on"
        time.sleep(0.2)
    return started
