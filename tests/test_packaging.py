"""Installs: the conda env of the rules and a non-editable install agree with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_conda_env_states_no_floors_of_its_own():
    """pyproject.toml is the one place with dependency floors: the env file pins only Python, inside
    requires-python, and lists no pip packages (the post-deploy install brings them, with the floors)."""
    env = yaml.safe_load((ROOT / "envs" / "moegate.yaml").read_text())
    versioned, python = [], None
    for dep in env["dependencies"]:
        assert isinstance(dep, str), f"envs/moegate.yaml: a pip section {dep!r}; pyproject.toml lists those"
        name, _, version = dep.partition("=")
        if name == "python":
            python = version
        elif re.search(r"[<>=!~]", dep):
            versioned.append(dep)
    assert not versioned, f"envs/moegate.yaml pins {versioned}: state floors in pyproject.toml only"
    assert python and SpecifierSet(_pyproject()["project"]["requires-python"]).contains(python + ".0")


def test_post_deploy_installs_moegate_with_its_dependencies():
    script = (ROOT / "envs" / "moegate.post-deploy.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert len(installs) == 1
    assert "--no-deps" not in installs[0], "without dependencies pyproject.toml's floors never reach the env"
    extras = re.search(r"\[([a-z,]+)\]", installs[0]).group(1).split(",")
    assert set(extras) <= set(_pyproject()["project"]["optional-dependencies"])


def test_a_wheel_install_validates_a_config(tmp_path):
    """A non-editable install (a wheel) ships the config schema: config.load works without the checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("moegate-*.whl")
    # every module of the package, the stages/ and models/ subpackages included, and the schema
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("moegate/")}
    package = ROOT / "src" / "moegate"
    expected = {f"moegate/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    assert expected <= shipped and "moegate/config.schema.yaml" in shipped, sorted(expected - shipped)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    probe = ("import moegate, moegate.config as c, moegate.stages.tune.workers, sys; "  # a subpackage too
             "assert moegate.__file__.startswith(sys.argv[1]), moegate.__file__; "
             "cfg = c.load(sys.argv[2]); print(cfg['router']['encoder_mode'])")
    out = subprocess.run([sys.executable, "-c", probe, str(site), str(ROOT / "config.yaml")],
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "frozen"
