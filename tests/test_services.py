"""CI must not pass by skipping: a missing server skips locally but fails under CI=true.

conftest.service_unavailable decides for the fixtures; tests/services/install.sh decides before pytest
runs. Both are checked here with the environment set by hand (a fake ``id`` and ``apt-get`` on a
PATH of their own), never by breaking the machine's apt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, in_ci, service_unavailable

INSTALL = REPO / "tests" / "services" / "install.sh"


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
    ("", False), ("false", False), ("0", False), (None, False),
])
def test_in_ci_reads_the_ci_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_an_unavailable_service_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no slurmctld here"):
        service_unavailable("no slurmctld here")


def test_an_unavailable_service_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no slurmctld here .*CI is set"):
        service_unavailable("no slurmctld here")


def _fake_bin(tmp_path: Path, uid: int, apt_rc: int | None) -> Path:
    """A PATH with only what install.sh calls: the real ls and tr, an ``id`` printing ``uid`` and, unless
    ``apt_rc`` is None, an ``apt-get`` that exits with it. slurmctld is not on it, so install.sh has work."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ls", "tr"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    if apt_rc is not None:
        log = tmp_path / "apt.log"
        (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {log}\nexit {apt_rc}\n')
    for script in bin_dir.iterdir():
        if not script.is_symlink():
            script.chmod(0o755)
    return bin_dir


def _install(bin_dir: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["/bin/sh", str(INSTALL)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("uid, apt_rc, why", [
    (1000, None, "not root or no apt-get"),
    (0, None, "not root or no apt-get"),
    (0, 100, "apt-get install failed"),
    (0, 0, "installed, but still missing"),  # apt-get "succeeded" but put nothing on this PATH
])
def test_install_sh_fails_under_ci_and_only_notes_it_locally(tmp_path, uid, apt_rc, why):
    bin_dir = _fake_bin(tmp_path, uid, apt_rc)
    local = _install(bin_dir, ci=None)
    assert local.returncode == 0 and why in local.stderr and "will skip" in local.stderr, local.stderr
    ci = _install(bin_dir, ci="true")
    assert ci.returncode == 1 and why in ci.stderr and "CI is set" in ci.stderr, ci.stderr
    assert "slurmctld" in ci.stderr  # names what it could not install
    if apt_rc is not None:  # it did try apt-get (the fake one)
        assert "install -y" in (tmp_path / "apt.log").read_text()


def test_llama_server_wheel_sh_fails_under_ci_and_only_notes_it_locally():
    # /bin/false as the Python: neither the import, the build nor the install can succeed, and nothing is
    # installed anywhere
    script = REPO / "tests" / "services" / "llama_server_wheel.sh"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    local = subprocess.run([str(script), "/bin/false"], env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert local.returncode == 0 and "will skip" in local.stderr, local.stderr
    ci = subprocess.run([str(script), "/bin/false"], env={**env, "CI": "true"}, capture_output=True, text=True,
                        timeout=120, check=False)
    assert ci.returncode == 1 and "CI is set" in ci.stderr, ci.stderr
