"""A real PostgreSQL server for tests: `initdb` + `pg_ctl` in a temporary directory, on a free
loopback port, durability off (nothing here must survive a crash), and run as an unprivileged
user when the tests run as root, since PostgreSQL refuses to. psycopg is imported only where a
database is created, so conftest can import this module without it."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "imagegen"
SESSION_DATABASE = "imagegen"
# Speed over durability: the cluster is thrown away with the test session.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# Unprivileged accounts to run the server as under root: Debian's package makes `postgres`.
SERVER_USERS = ("postgres", "nobody")
INSTALL_HINT = (
    "run scripts/setup (as root it installs Debian's postgresql) or apt-get install postgresql"
)


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be run here; the message says what is missing and the fix."""


@dataclass
class PostgresServer:
    """A running server; `url` is the session's database, `create_database` makes more."""

    port: int
    root: Path
    bin_dir: Path
    user: str | None

    @property
    def url(self) -> str:
        return self.url_for(SESSION_DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drops it even when a test left connections open (FORCE ends them)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def find_bin_dir() -> Path | None:
    """The folder with initdb and pg_ctl: from PATH, else Debian's newest
    /usr/lib/postgresql/VERSION/bin (off PATH)."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: _version(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _version(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return ()


def _server_user() -> str | None:
    """Who runs the server: None (this process's user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresUnavailable(
        f"running as root and none of the users {', '.join(SERVER_USERS)} exists to run "
        "PostgreSQL as (it refuses root): create one, e.g. useradd --system postgres"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(cmd: list[str], user: str | None, root: Path) -> subprocess.CompletedProcess[str]:
    # PG* variables of the caller (PGDATA, PGPORT, PGHOST) must not steer the test cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(root)
    return subprocess.run(
        cmd,
        cwd=root,  # the server user may not be able to enter the caller's folder
        env=env,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user else None,
        extra_groups=[] if user else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def running_postgres(*, durable: bool = False) -> Iterator[PostgresServer]:
    """A fresh cluster with a database SESSION_DATABASE, stopped (`pg_ctl stop -m fast`) and
    removed on exit. Raises PostgresUnavailable before starting when it cannot run here.
    `durable` keeps PostgreSQL's own fsync and commit settings (for figures a deployment
    would see; tests leave them off)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(f"no PostgreSQL server (initdb, pg_ctl) found: {INSTALL_HINT}")
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise PostgresUnavailable("psycopg is not installed: run scripts/setup") from exc
    user = _server_user()
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, closed to the server user.
    root = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        data = root / "data"
        init = _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",  # loopback only, throwaway cluster
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            user,
            root,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        chosen = SETTINGS if not durable else {"listen_addresses": SETTINGS["listen_addresses"]}
        conf = dict(chosen, unix_socket_directories=f"'{root}'")
        with (data / "postgresql.conf").open("a") as out:
            out.write("\n# tests/postgres.py\n")
            out.writelines(f"{key} = {value}\n" for key, value in conf.items())
        server = _start(bin_dir, root, user)
        try:
            server.create_database(SESSION_DATABASE)
            yield server
        finally:
            _stop(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start(bin_dir: Path, root: Path, user: str | None) -> PostgresServer:
    log = root / "server.log"
    # The port is free when picked but not reserved: another process may take it before the
    # server binds, so a bind failure is retried on a new port.
    for _attempt in range(5):
        port = _free_port()
        started = _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-l",
                str(log),
                "-o",
                f"-p {port}",
                "-w",
                "-t",
                "60",
                "start",
            ],
            user,
            root,
        )
        if started.returncode == 0:
            return PostgresServer(port=port, root=root, bin_dir=bin_dir, user=user)
        if "could not bind" not in _tail(log, 50):
            break
    raise RuntimeError(
        f"pg_ctl start failed ({started.returncode}): {started.stderr.strip()}\n"
        f"server log ({log}):\n{_tail(log)}"
    )


def _stop(server: PostgresServer) -> None:
    data = str(server.root / "data")
    stopped = _run(
        [str(server.bin_dir / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"],
        server.user,
        server.root,
    )
    if stopped.returncode != 0:
        # A fast stop waits on nothing but can still time out on a wedged server: do not leave
        # it running past the session.
        _run(
            [str(server.bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
            server.user,
            server.root,
        )
