"""A real, throw-away PostgreSQL 15 server for tests (a pytest fixture module).

Use it from a test module with ``from postgres import postgres_server  # noqa: F401`` and ask for the
``postgres_server`` fixture. The server runs from the Debian binaries (``/usr/lib/postgresql/15/bin``;
``apt-get install -y postgresql`` provides them), listens on a free loopback port and keeps its data
directory and unix socket in a temporary folder. PostgreSQL refuses to run as root, so under root it
runs as the ``postgres`` user (``runuser``). When it cannot start (no binaries, root without a
``postgres`` user, initdb or start failing) the tests that need it are skipped with the reason; the server
is always stopped and its folder removed at the end of the session.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class PostgresServer:
    """A running server: ``url(db)`` gives a SQLAlchemy URL for a database made by ``create_database``."""

    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner() -> tuple[list[str], int | None, int | None]:
    """Command prefix and uid/gid that run the server binaries as a non-root user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root and there is no 'postgres' user to run it as")
    if shutil.which("runuser") is None:
        pytest.skip("running PostgreSQL as the postgres user needs runuser (util-linux)")
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"PostgreSQL {what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start PostgreSQL 15 on 127.0.0.1:<free port>, yield it, stop it."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            pytest.skip(f"{PG_BIN / tool} is missing (apt-get install -y postgresql)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary)")
    prefix, uid, gid = _runner()
    # Not under pytest's tmp_path: its parents are private to root and the postgres user must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="sam3d_pg_"))
    root.chmod(0o755)
    data, sock, log = root / "data", root / "socket", root / "server.log"
    data.mkdir()
    sock.mkdir()
    if uid is not None:
        for p in (root, data, sock):
            os.chown(p, uid, gid)
    user = "postgres"
    port = _free_port()
    started = False
    try:
        _run(prefix + [str(PG_BIN / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                       "--no-instructions"], "initdb")
        options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60",
                       "start"], "start")
        started = True
        print(f"PostgreSQL 15 test server on 127.0.0.1:{port} (data {data})")
        yield PostgresServer("127.0.0.1", port, user)
    finally:
        if started:
            subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
