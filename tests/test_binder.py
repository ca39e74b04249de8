"""binder/ launches the quickstart on a CPU-only Binder: the same files, in a fresh virtualenv, run it.

repo2docker installs ``binder/requirements.txt`` from the repository root into
an environment that already has JupyterLab, then runs ``binder/postBuild``. This
test does the same in a new virtualenv (adding only the notebook runner that
Binder's image brings) and executes ``notebooks/quickstart.ipynb`` there.
"""

from __future__ import annotations

import pytest
from conftest import fresh_venv, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a whole install: minutes

#: What Binder's base image brings besides the repository's own requirements.
BINDER_IMAGE = ["jupyterlab", "nbconvert", "ipykernel"]


def test_the_binder_files_install_and_run_the_quickstart_in_a_fresh_virtualenv(tmp_path):
    repo, bin_, env = fresh_venv(tmp_path)  # the repository as Binder sees it: the tracked files
    run_ok([bin_ / "python", "-m", "pip", "install", "-q", *BINDER_IMAGE], cwd=repo, env=env, timeout=900)
    run_ok([bin_ / "python", "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], cwd=repo, env=env,
           timeout=1800)
    run_ok(["bash", "binder/postBuild"], cwd=repo, env=env, timeout=600)
    out = tmp_path / "out"
    run_ok([bin_ / "jupyter", "nbconvert", "--to", "notebook", "--execute", "notebooks/quickstart.ipynb",
          "--ExecutePreprocessor.timeout=900", "--output-dir", str(out), "--output", "quickstart.ipynb"],
         cwd=repo, env=env, timeout=1200)
    executed = (out / "quickstart.ipynb").read_text()
    assert "the tuned model knows the facts" in executed
    assert '"output_type": "error"' not in executed
