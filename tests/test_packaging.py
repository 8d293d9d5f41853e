"""The wheel a user installs from an index holds the shipped studies: built here from this checkout's files
(in this environment, no download), it carries search_spaces/*.yaml as raydist/search_spaces/, and a copy
installed from it finds the default study by name, away from any checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_built_wheel_holds_every_shipped_study_and_its_install_finds_the_default_one(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build's own folders never land in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("raydist", "search_spaces"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "wheels"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("raydist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(path.name for path in (REPO / "search_spaces").glob("*.yaml"))
    assert len(shipped) >= 9
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("raydist/search_spaces/")) == shipped
    assert "raydist/presets/dli.yaml" in names

    # Installed: a pure-Python wheel unpacked into a folder on the path, as pip lays it out, ahead of this
    # checkout's editable install; the study is found by name and loads there.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import raydist.tune as t; from raydist.study.study_file import load_study; "
            "path = t.find_study_file(t.DEFAULT_STUDY); study = load_study(path); "
            "print(t.__file__); print(path); print(study.name, len(study.searched))")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(site)})
    assert found.returncode == 0, found.stderr[-3000:]
    module, path, study = found.stdout.strip().splitlines()
    assert module == str(site / "raydist" / "tune.py")
    assert path == str(site / "raydist" / "search_spaces" / "digits_quick.yaml")
    assert study.startswith("digits_quick ")
