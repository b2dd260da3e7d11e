"""Every notebook in ``notebooks/`` runs top to bottom on the demo model (issue 8: executed in CI).

Each notebook is executed with nbclient in a fresh IPython kernel that runs THIS interpreter
(``sys.executable``, i.e. the venv the tests run in, through a kernelspec written to a temporary folder —
never a system-wide ``python3`` kernel that may lack the package). The kernel's environment: CPU only
(``JAX_PLATFORMS=cpu``), the demo checkpoint cached in a temporary ``MINICPMV_JAX_CACHE`` and
``MINICPMV_MODEL=demo``. A cell that raises (including the notebooks' own ``assert`` checks) fails the
test with the cell's source and traceback; a cell running longer than :data:`CELL_TIMEOUT_S` fails it too.

Notebooks are committed without outputs (:func:`test_notebooks_are_committed_without_outputs`): CI
executes them; outputs in git would only go stale.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "minicpmv-jax-tests"


def _kernel_manager(tmp_path: pathlib.Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec launches ``sys.executable -m ipykernel_launcher``."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    # IPC sockets under tmp_path: local only, and no files in the notebook folder (the kernel's cwd).
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs, transport="ipc",
                              ip=str(tmp_path / "kernel-ipc"))


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINICPMV_", "PYTEST_"))}
    (tmp_path / "tmp").mkdir()
    env.update(JAX_PLATFORMS="cpu", MINICPMV_MODEL="demo", MINICPMV_JAX_CACHE=str(tmp_path / "cache"),
               TMPDIR=str(tmp_path / "tmp"), MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # The notebooks choose their own XLA flags (02 asks for 8 simulated devices before importing jax).
    env.pop("XLA_FLAGS", None)
    return env


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert "01_quickstart.ipynb" in names and "02_sharding.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))  # which python ran
    env = _kernel_env(tmp_path)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                                     kernel_name=KERNEL_NAME, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down at the end
    except nbclient.exceptions.CellExecutionError as e:  # names the cell and carries its traceback
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    elapsed = time.perf_counter() - t0
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{path.name}: not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    assert code[-1].outputs[0].text == sys.executable, "the kernel must run the test's own interpreter"
    print(f"{path.name}: {len(code)} code cells in {elapsed:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stale = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not stale, (f"{path.name}: cells {stale} have outputs; strip them (CI executes the notebooks): "
                       "see notebooks/README.md")


def test_the_notebooks_readme_installs_every_tool_it_runs():
    """Each command of notebooks/README.md (its bash blocks and inline code) runs a tool of the venv that the
    README's test command installs (python, pip, pytest) or that a ``pip install`` before it brings
    (JupyterLab brings ``jupyter`` and its ``nbconvert``); no bare ``jupyter`` from elsewhere."""
    text = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    commands = sorted([(m.start(), line) for m in re.finditer(r"```bash\n(.*?)```", text, re.S)
                       for line in m.group(1).splitlines()]
                      + [(m.start(), m.group(1)) for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", text)])
    provided = {"jupyterlab": {"jupyter"}}
    available = {"python", "pip", "pytest"}
    checked = 0
    for _, command in commands:
        words = [w for w in command.split() if "=" not in w]  # without VAR=value prefixes
        if not words:
            continue
        assert words[0] not in ("jupyter", "nbconvert", "pip", "python", "pytest"), \
            f"notebooks/README.md runs `{command}` outside the venv"
        if words[0].startswith(".venv/bin/"):
            tool = words[0].removeprefix(".venv/bin/")
            assert tool in available, f"notebooks/README.md runs `{command}` before anything installs {tool}"
            if tool == "pip" and words[1:2] == ["install"]:
                available |= {t for package in words[2:] for t in provided.get(package, {package})}
            checked += 1
    assert checked >= 3
