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
