"""binder/ launches the quickstart on a CPU-only Binder: the same files, in a fresh virtualenv, run it.

repo2docker installs ``binder/requirements.txt`` from the repository root into
an environment that already has JupyterLab, then runs ``binder/postBuild``. This
test does the same in a new virtualenv (adding only the notebook runner that
Binder's image brings) and executes ``notebooks/quickstart.ipynb`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a whole install: minutes

REPO = Path(__file__).resolve().parent.parent
#: What Binder's base image brings besides the repository's own requirements.
BINDER_IMAGE = ["jupyterlab", "nbconvert", "ipykernel"]


def _run(command, *, cwd, env, timeout):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_binder_files_install_and_run_the_quickstart_in_a_fresh_virtualenv(tmp_path):
    repo = tmp_path / "repo"
    # The repository as Binder sees it: the tracked files (no .venv, no outputs).
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=repo, env=os.environ, timeout=120)
    bin_ = venv / "bin"
    env = dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               TUNING_MAGICS_HOME=str(tmp_path / "home"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    _run([bin_ / "python", "-m", "pip", "install", "-q", *BINDER_IMAGE], cwd=repo, env=env, timeout=900)
    _run([bin_ / "python", "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], cwd=repo, env=env,
         timeout=1800)
    _run(["bash", "binder/postBuild"], cwd=repo, env=env, timeout=600)
    out = tmp_path / "out"
    _run([bin_ / "jupyter", "nbconvert", "--to", "notebook", "--execute", "notebooks/quickstart.ipynb",
          "--ExecutePreprocessor.timeout=900", "--output-dir", str(out), "--output", "quickstart.ipynb"],
         cwd=repo, env=env, timeout=1200)
    executed = (out / "quickstart.ipynb").read_text()
    assert "the tuned model knows the facts" in executed
    assert '"output_type": "error"' not in executed
