"""What a user who installs from a wheel gets: every sub-package and the
reference models (the demo's among them), found from outside the
repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the build writes nothing
    into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "renorm_convert", src / "renorm_convert",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # Built as pip builds it for a user (setuptools from the registry).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, env=subprocess_env())
    (built,) = out.glob("renorm_convert-*.whl")
    return built


def test_wheel_holds_every_package_and_the_reference_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in
                (ROOT / "renorm_convert").rglob("__init__.py")}
    assert {"renorm_convert/transform", "renorm_convert/onnx",
            "renorm_convert/train/diagnosis"} <= packages
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    for model in ("inception_fmnist", "resnet_fmnist"):
        assert f"renorm_convert/reference/{model}.keras" in names


def test_installed_wheel_finds_its_reference_model(wheel, tmp_path):
    """Installed elsewhere, run from a directory that is not the checkout:
    the demo's model is the one inside the installed package, and it is
    the repository's file byte for byte."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                    "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, env=subprocess_env())
    code = ("import renorm_convert, renorm_convert.reference as r; "
            "print(renorm_convert.__file__); print(r.path())")
    env = subprocess_env()
    env["PYTHONPATH"] = str(target)
    lines = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                           env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    package, model = (Path(line) for line in lines[-2:])
    assert package.is_relative_to(target) and model.is_relative_to(target)
    original = ROOT / "renorm_convert/reference/inception_fmnist.keras"
    assert model.read_bytes() == original.read_bytes()
    assert os.path.getsize(model) > 100_000
