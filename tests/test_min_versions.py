"""The [vertex] extra's floors: the lowest SDK versions pyproject.toml declares are true, and older ones are named.

Colab and Workbench come with google-genai and google-cloud-aiplatform already
installed, and pip keeps whatever satisfies a floor: so each floor is the lowest
version the Vertex code works with (pyproject.toml says which feature needs it),
proven by running the Vertex tests in a fresh virtualenv with exactly those
versions. An older SDK found at run time is named in one line with the
``pip install -U`` to run (``errors.require_extra``), before any SDK is imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import fresh_venv, run_ok

REPO = Path(__file__).resolve().parent.parent
#: The tests that run against the lowest versions: the Vertex backend and Cloud Storage, through the real SDKs.
TESTS = ["tests/test_vertex_backend.py", "tests/test_vertex_endpoints.py", "tests/test_vertex_metrics.py",
         "tests/test_fake_vertex.py", "tests/test_storage.py", "tests/test_gcs_faults.py", "tests/test_min_versions.py"]
#: Tests among them that need the [local] extra (torch), which the fresh virtualenv does not install.
NEEDS_LOCAL = ["tests/test_vertex_backend.py::test_open_models_go_to_vertex_where_a_project_is_set_and_local_models_never_do"]
#: What the tests need besides the package's own dependencies, as the dev extra declares them.
TEST_TOOLS = ("pytest", "pytest-timeout", "gcp-storage-emulator")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()


def vertex_floors() -> dict[str, str]:
    """``{distribution: floor}`` of the vertex extra, from pyproject.toml (each one is ``name>=X``)."""
    floors = {}
    for requirement in _project()["optional-dependencies"]["vertex"]:
        floor = re.fullmatch(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*>=\s*(\d+(?:\.\d+)*)\s*", requirement)
        assert floor, f"the vertex extra declares each package as name>=X.Y.Z (a floor this test installs): {requirement}"
        floors[_name(requirement)] = floor.group(1)
    return floors


# ====================================================================== an older SDK at run time


def _below(version: str) -> str:
    """A release before ``version`` (2.11.0: 2.10.0; 3.0.0: 2.0.0)."""
    parts = [int(p) for p in version.split(".")]
    k = max((i for i, p in enumerate(parts) if p > 0), default=0)
    return ".".join(str(p - 1 if i == k else 0 if i > k else p) for i, p in enumerate(parts))


def _with_installed(tmp_path, versions: dict[str, str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importlib.metadata finds ``versions`` installed.

    A folder of ``.dist-info`` metadata goes first on sys.path: the installed
    packages' versions are read from there (the modules themselves are the real
    ones), and so are the floors tuning_magics declares, taken from
    pyproject.toml as pip would write them into its metadata.
    """
    shadow = tmp_path / "site"
    requires = "".join(f'Requires-Dist: {r}; extra == "vertex"\n' for r in _project()["optional-dependencies"]["vertex"])
    for name, version in {"tuning_magics": "0.1.0", **versions}.items():
        info = shadow / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + (requires if name == "tuning_magics" else ""), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")])),
               GOOGLE_CLOUD_PROJECT="fake-project")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)


_CONTEXT = """
from tuning_magics.backends.vertex import client
from tuning_magics.errors import MissingExtra
try:
    client.context(credentials=False)
except MissingExtra as exc:
    print("MISSING", exc)
else:
    print("OK")
"""


@pytest.mark.parametrize("dist", sorted(vertex_floors()))
def test_an_sdk_older_than_its_floor_is_named_in_one_line_with_the_pip_install_torun_ok(tmp_path, dist):
    floors = vertex_floors()
    old = _below(floors[dist])
    done = _with_installed(tmp_path, {**floors, dist: old}, _CONTEXT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f'MISSING {dist} {old} is older than tuning_magics[vertex] needs: pip install -U "{dist}>={floors[dist]}", '
        "then restart the kernel"]


def test_several_old_sdks_are_named_together_and_the_floors_themselves_pass(tmp_path):
    floors = vertex_floors()
    at_floor = _with_installed(tmp_path / "at-floor", floors, _CONTEXT)
    assert at_floor.stdout.split() == ["OK"], at_floor.stderr
    older = _with_installed(tmp_path / "older", {**floors, "google-genai": "1.61.0",
                                                 "google-cloud-aiplatform": "1.90.0"}, _CONTEXT)
    assert older.stdout.splitlines() == [
        f"MISSING google-genai 1.61.0 and google-cloud-aiplatform 1.90.0 are older than tuning_magics[vertex] needs: "
        f'pip install -U "google-genai>={floors["google-genai"]}" '
        f'"google-cloud-aiplatform>={floors["google-cloud-aiplatform"]}", then restart the kernel'], older.stderr


def test_cloud_storage_asks_only_for_its_own_packages_to_be_new_enough(tmp_path):
    """gs:// datasets of the local engine need google-cloud-storage, not a newer google-genai."""
    floors = vertex_floors()
    code = ("from tuning_magics.errors import require_extra, MissingExtra\n"
            "try:\n    require_extra('vertex', 'google.cloud.storage', 'google_crc32c')\n"
            "except MissingExtra as exc:\n    print('MISSING', exc)\nelse:\n    print('OK')\n")
    old_genai = _with_installed(tmp_path / "genai", {**floors, "google-genai": "1.0.0"}, code)
    assert old_genai.stdout.split() == ["OK"], old_genai.stderr
    old_storage = _with_installed(tmp_path / "storage", {**floors, "google-cloud-storage": "2.19.0"}, code)
    assert old_storage.stdout.startswith("MISSING google-cloud-storage 2.19.0 is older than tuning_magics[vertex] "
                                         f'needs: pip install -U "google-cloud-storage>={floors["google-cloud-storage"]}"')


# ====================================================================== the floors themselves, installed


@pytest.mark.slow
@pytest.mark.timeout(1800)  # an install (pip's cache makes it about a minute) and the tests (about three)
def test_the_vertex_and_cloud_storage_tests_pass_with_the_lowest_versions_the_vertex_extra_declares(tmp_path):
    repo, bin_, env = fresh_venv(tmp_path)  # the tracked files, as pip builds the package from them
    floors = vertex_floors()
    project = _project()
    tools = [r for r in project["optional-dependencies"]["dev"] if _name(r) in TEST_TOOLS]
    assert len(tools) == len(TEST_TOOLS), f"the dev extra no longer declares all of {TEST_TOOLS}"
    pins = [f"{dist}=={floor}" for dist, floor in floors.items()]
    run_ok([bin_ / "python", "-m", "pip", "install", "-q", *pins, *project["dependencies"], *tools], cwd=repo, env=env,
         timeout=1200)
    run_ok([bin_ / "python", "-m", "pip", "install", "-q", "--no-deps", "."], cwd=repo, env=env, timeout=600)
    listed = run_ok([bin_ / "python", "-c", "import importlib.metadata as m, sys; "
                   "print(' '.join(f'{d}=={m.version(d)}' for d in sys.argv[1:]))", *floors], cwd=tmp_path, env=env,
                  timeout=60).stdout.split()
    assert listed == pins
    # The installed package, not the copy's source folder, is what the tests import (pytest, not python -m pytest).
    done = run_ok([bin_ / "pytest", *TESTS, "-q", "-p", "no:cacheprovider", "-m", "not slow",
                 *(f"--deselect={t}" for t in NEEDS_LOCAL)], cwd=repo, env=env, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "error" not in summary, done.stdout[-4000:]
