"""A real PostgreSQL server on localhost for the tests, from Debian's `postgresql` package (scripts/
install_system_deps.sh installs it): initdb into a temporary folder, started with pg_ctl on a free port, trust
authentication, stopped afterwards. Run as the `postgres` user when the tests run as root (initdb refuses root)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import free_port


def _binary(name: str) -> str:
    debian = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = shutil.which(name) or next(iter(debian), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: run scripts/install_system_deps.sh (make install does)")
    return found


@contextmanager
def postgres_server(database: str = "cpwb"):
    """Yield the SQLAlchemy URL of a fresh database on a PostgreSQL server in a temporary folder of its own (not
    pytest's tmp_path, whose parents only root may enter)."""
    folder = Path(tempfile.mkdtemp(prefix="cpwb-postgres-"))
    as_user: list[str] = []
    user = "postgres"
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    else:
        user = os.environ.get("USER", "postgres")
    data, port = folder / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(_binary("initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync")
    run(_binary("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start", "-o",
        f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off")
    try:
        run(_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database)
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}"
    finally:
        run(_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
