"""`pip install .` into a fresh virtual environment gives working console scripts, outside the checkout.

Offline: the new environment sees this one's packages through a .pth file (the dependencies, pip and
setuptools are not downloaded again), and the package is installed with --no-deps --no-build-isolation
--no-index. Its own modules must then come from the new environment's site-packages, not from the checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TOP_LEVEL = ("proto", "common", "server", "client", "scripts")
SCRIPTS = {
    "subspacefl-server": "Run the federated LoRA coordinator",
    "subspacefl-client": "Run one federated LoRA client",
    "subspacefl-local": "Start a local federation on 127.0.0.1",
}


def _requirements(name: str) -> list[str]:
    lines = [line.strip() for line in (ROOT / name).read_text().splitlines()]
    return [str(Requirement(line)) for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"                    # a copy: the build writes build/ and *.egg-info next to the sources
    packages = {name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]}
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        name for name in names
        if Path(folder) == ROOT and name not in packages | {"configs", "pyproject.toml", "README.md"}
        and not name.startswith("requirements")
        or name in ("__pycache__", "build") or name.endswith(".egg-info")])
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", str(source)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"tmp": tmp, "venv": venv, "python": python, "site": site, "env": env}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_answers_help_from_outside_the_checkout(installed, script):
    result = subprocess.run([str(installed["venv"] / "bin" / script), "--help"], cwd=installed["tmp"],
                            env=installed["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: ") and SCRIPTS[script] in result.stdout


def test_the_installed_modules_come_from_the_new_environment(installed):
    code = (f"TOP_LEVEL = {TOP_LEVEL!r};"
            "import json, proto, server, client, common, scripts.local_federation as launcher, importlib.metadata as m;"
            "print(json.dumps({'files': [proto.__file__, server.__file__, client.__file__, common.__file__],"
            " 'configs': str(launcher.CONFIGS), 'requires': m.requires('subspace-fl'),"
            " 'owners': {name: m.packages_distributions().get(name) for name in TOP_LEVEL},"
            " 'proto': sorted(p.name for p in m.files('subspace-fl') if p.parent.name == 'proto')}))")
    result = subprocess.run([str(installed["python"]), "-c", code], cwd=installed["tmp"], env=installed["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    site = installed["site"].resolve()
    assert all(Path(path).resolve().is_relative_to(site) for path in found["files"]), found["files"]
    # README's clash check: each generic top-level name belongs to this distribution alone, here (the new
    # environment sees the project environment's distributions too).
    assert found["owners"] == {name: ["subspace-fl"] for name in TOP_LEVEL}
    assert Path(found["configs"]).resolve() == site / "scripts" / "configs"
    assert (site / "scripts" / "configs" / "minilm_bbc.yaml").read_text() == (
        ROOT / "configs" / "minilm_bbc.yaml").read_text()
    assert {"federation.proto", "federation_pb2.py", "federation_pb2_grpc.py", "federation_pb2.pyi"} <= set(
        found["proto"])
    # The dependencies are requirements.txt's, the extras requirements-dev.txt's and requirements-models.txt's.
    extras = {"dev": _requirements("requirements-dev.txt"), "models": _requirements("requirements-models.txt")}
    expected = _requirements("requirements.txt") + [f'{req}; extra == "{extra}"'
                                                   for extra, reqs in extras.items() for req in reqs]
    assert sorted(str(Requirement(req)) for req in found["requires"]) == sorted(
        str(Requirement(req)) for req in expected)
    assert "torch==2.13.0" in found["requires"]


def test_the_installed_launcher_reads_its_shipped_default_config(installed, tmp_path):
    # A misspelt key is refused with a suggestion only once the default config file was found and read.
    result = subprocess.run([str(installed["venv"] / "bin" / "subspacefl-local"), "--run-dir", str(tmp_path / "r"),
                             "methd=fedavg"], cwd=tmp_path, env=installed["env"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "did you mean 'method'" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.integration
def test_the_installed_launcher_runs_a_federation_in_the_current_directory(installed, tmp_path):
    result = subprocess.run([str(installed["venv"] / "bin" / "subspacefl-local"), "--tiny-model", "--timeout", "400",
                             "num_rounds=1", "num_clients=2", "client_fraction=1.0", "max_train_samples=100",
                             "max_eval_samples=40", "max_local_steps=2", "method=fedavg"],
                            cwd=tmp_path, env=installed["env"], capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs"         # runs/ of the directory it was started in
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not (installed["site"] / "runs").exists()
