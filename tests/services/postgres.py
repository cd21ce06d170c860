"""A real PostgreSQL server in a temporary directory, for the tests of Optuna's RDB storage.

``initdb`` + ``pg_ctl start`` with the data directory and the Unix socket under one state directory,
listening on 127.0.0.1 at a random free port with password (scram-sha-256) authentication. When the
tests run as root the server runs as the ``postgres`` OS user (PostgreSQL refuses to run as root).
Nothing under /etc or /var/run is touched, so a system PostgreSQL on the machine is never disturbed.

From pytest: the ``postgres`` fixture in tests/conftest.py. By hand (the state directory's parents
must be searchable by the ``postgres`` user, so not under pytest's 0700 tmp dirs)::

    python tests/services/postgres.py up /tmp/pg      # prints the superuser URL (password in it)
    python tests/services/postgres.py down /tmp/pg
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"
OS_USER = "postgres"  # the server's owner when the tests run as root


def _find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable_reason() -> str | None:
    """Why a server cannot be started here (None when it can)."""
    missing = [b for b in ("initdb", "pg_ctl") if _find_bin(b) is None]
    if missing:
        return f"PostgreSQL needs {', '.join(missing)} (run tests/services/install.sh as root)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root but there is no {OS_USER!r} OS user to own the server"
    try:
        import psycopg  # noqa: F401  (the driver Optuna's RDB storage uses here)
    except ImportError:
        return "psycopg is not installed (pip install 'moegate[postgres]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """One server; ``start()`` then ``database(name)`` for an empty database and its URL; ``stop()``.

    ``state_dir`` None: a fresh directory under the system temp dir, removed again by ``stop()``.
    """

    state_dir: Path | None = None
    port: int = field(default_factory=_free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))

    def __post_init__(self):
        self._owns_state_dir = self.state_dir is None
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="moegate-pg-"))
        self.state_dir = Path(self.state_dir)
        self._user = OS_USER if os.geteuid() == 0 else None  # None = the current user

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "server.log"

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, user=self._user, check=True, capture_output=True, text=True,
                              cwd=self.state_dir, **kwargs)

    def start(self, timeout: int = 60) -> PostgresServer:
        """initdb (once) and start the server; raises RuntimeError with the server log on failure."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            owner = pwd.getpwnam(self._user)
            os.chown(self.state_dir, owner.pw_uid, owner.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            pwfile = self.state_dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._user:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            try:
                self._run([_find_bin("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=scram-sha-256",
                           f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"])
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"initdb failed in {self.data_dir}:\n{e.stdout}\n{e.stderr}") from None
            finally:
                pwfile.unlink(missing_ok=True)
        options = f"-p {self.port} -k {self.state_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            self._run([_find_bin("pg_ctl"), "start", "-w", "-t", str(timeout), "-D", str(self.data_dir),
                       "-l", str(self.log_file), "-o", options])
        except subprocess.CalledProcessError as e:
            log = self.log_file.read_text() if self.log_file.exists() else "(no server log)"
            raise RuntimeError(f"pg_ctl start failed on port {self.port}:\n{e.stderr}\n{log}") from None
        (self.state_dir / "server.json").write_text(json.dumps({"port": self.port}))
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown); quiet when it is not running. Removes a state dir it made."""
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run([_find_bin("pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data_dir)],
                           user=self._user, capture_output=True, text=True, cwd=self.state_dir, check=False)
        if self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def url(self, database: str = "postgres", with_password: bool = True) -> str:
        """A SQLAlchemy URL for the psycopg 3 driver; without the password when ``with_password`` is False."""
        auth = f"{SUPERUSER}:{self.password}" if with_password else SUPERUSER
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); return its URL without the password."""
        import psycopg

        name = name or f"test_{secrets.token_hex(4)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, with_password=False)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    state = Path(argv[2])
    if argv[1] == "up":
        reason = unavailable_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        server = PostgresServer(state).start()
        print(server.url())
    else:
        port = json.loads((state / "server.json").read_text())["port"]
        PostgresServer(state, port=port).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
