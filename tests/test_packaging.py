"""A wheel works outside a checkout, and `watchtower alerts export` hands a Prometheus host its files.

The wheel is built as `python -m build` builds it (an sdist, then the wheel from the unpacked sdist,
so both are proven), installed without dependencies into a fresh venv that borrows this venv's
site-packages through a .pth file (torch & co: offline, seconds), and run from an empty directory
with no PYTHONPATH, so nothing can be found through the repository. `watchtower demo` (a minute,
several on a loaded machine) is not run there: its job file and the preset it names are loaded
instead, which is all it reads from the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from watchtower import cli, shipped
from watchtower.toml_dataclasses import read_toml


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def source_modules() -> list[str]:
    """Where each .py file of the package folders pyproject maps (`package-dir`) lands in a wheel.
    A subpackage missing from pyproject's `packages` is silently left out: no warning says so."""
    mapped = read_toml(REPO / "pyproject.toml")["tool"]["setuptools"]["package-dir"]
    return [f"{package.replace('.', '/')}/{path.relative_to(REPO / folder).as_posix()}"
            for package, folder in mapped.items() for path in (REPO / folder).rglob("*.py")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the built wheel (plus a .pth to this venv's dependencies); its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(REPO)], tmp)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    assert len(list((tmp / "dist").glob("*.tar.gz"))) == 1
    left_out = sorted(set(source_modules()) - set(zipfile.ZipFile(wheel).namelist()))
    assert not left_out, f"not in the wheel (add their packages to pyproject's packages): {left_out}"
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    pip = run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
               str(wheel)], tmp)
    assert pip.returncode == 0, pip.stderr
    # After the install, or pip would take this venv's (editable) watchtower for the wheel's.
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    (Path(site) / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return tmp / "venv" / "bin"


def test_the_wheel_works_outside_a_checkout(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv_dir = installed.parent

    def ok(*args: str) -> str:
        result = run([str(installed / "watchtower"), *args], tmp_path, env)
        assert result.returncode == 0, f"watchtower {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    where = run([str(installed / "python"), "-c", "import watchtower, watchtower.shipped as s; "
                 "from watchtower.supervisor.config import load_job; "
                 "job, trainer = load_job(str(s.demo_job_file()), []); "
                 "print(watchtower.__file__, s.rules_file(), s.preset_names(), trainer.model.dim)"], tmp_path, env)
    assert where.returncode == 0, where.stderr
    module, rules, *_ = where.stdout.split()
    assert Path(module).is_relative_to(venv_dir) and Path(rules).is_relative_to(venv_dir), where.stdout
    assert "'tiny'" in where.stdout and "'smol-135m'" in where.stdout

    ok("prometheus-config", "--out", "prometheus.yml", "--targets-file", "targets.json")
    (rule_file,) = yaml.safe_load((tmp_path / "prometheus.yml").read_text())["rule_files"]
    assert Path(rule_file).is_relative_to(venv_dir) and Path(rule_file).is_file()
    assert "up to date" in ok("dashboards", "build", "--check")
    assert "--prometheus" in ok("tui", "--help")
    ok("alerts", "export", "host")
    assert {p.name for p in (tmp_path / "host").iterdir()} == {"rules.yml", "alertmanager.yml"}


def test_alerts_export_writes_the_shipped_files_and_refuses_a_file_it_did_not_write(tmp_path, capsys):
    """Exported files load as the shipped ones; a re-export refreshes them; a file a person wrote or
    edited (and a DIR that is a file) is refused with one line and exit 2, and nothing is written."""
    host = tmp_path / "prom"
    assert cli.main(["alerts", "export", str(host)]) == 0
    for name, shipped_file in (("rules.yml", shipped.rules_file()), ("alertmanager.yml", shipped.alertmanager_file())):
        assert yaml.safe_load((host / name).read_text()) == yaml.safe_load(shipped_file.read_text())
    assert cli.main(["alerts", "export", str(host)]) == 0  # its own files: refreshed
    capsys.readouterr()

    edited = (host / "alertmanager.yml").read_text().replace("resolve_timeout: 5m", "resolve_timeout: 9m")
    (host / "alertmanager.yml").write_text(edited)
    (host / "rules.yml").unlink()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "rules.yml").write_text("groups: []\n")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for target, named in ((host, "alertmanager.yml"), (foreign, "rules.yml"), (a_file, "afile")):
        assert cli.main(["alerts", "export", str(target)]) == cli.EXIT_CONFIG
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert not (host / "rules.yml").exists() and (host / "alertmanager.yml").read_text() == edited
    assert (foreign / "rules.yml").read_text() == "groups: []\n" and not (foreign / "alertmanager.yml").exists()


def test_alerts_export_never_replaces_a_symlink(tmp_path, capsys):
    """A DIR/rules.yml that links to the rules Prometheus reads elsewhere (or to a path not there
    now) was replaced by a plain file: the link gone, the file it named left stale. Refused now,
    one line naming it, nothing written."""
    assert cli.main(["alerts", "export", str(tmp_path / "real")]) == 0
    for name, link_to in (("linked", tmp_path / "real" / "rules.yml"), ("dangling", tmp_path / "absent.yml")):
        host = tmp_path / name
        host.mkdir()
        (host / "rules.yml").symlink_to(link_to)
        capsys.readouterr()
        assert cli.main(["alerts", "export", str(host)]) == cli.EXIT_CONFIG
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "symlink" in err, err
        assert (host / "rules.yml").is_symlink() and not (host / "alertmanager.yml").exists()
