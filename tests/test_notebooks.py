"""The notebooks are committed without outputs and are executed by the test command itself.

Executing them is nbmake's job (`--nbmake` in pytest's addopts, `notebooks` in its testpaths), so
`python -m pytest -q` runs every notebook top to bottom; these tests check what that relies on.
"""

import tomllib

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
DEVICE_FLAG = "xla_force_host_platform_device_count"


def test_the_test_command_executes_every_notebook():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in options["testpaths"] and "--nbmake" in options["addopts"].split()
    assert {"quickstart", "sharding", "moe", "accounting", "diffusion"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs_or_execution_counts(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before committing"
    assert not any(c.get("attachments") for c in nb.cells), f"{path.name}: markdown cells carry attachments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_simulated_device_count_is_set_before_jax_is_imported(path):
    # nbmake starts each notebook in a fresh kernel: XLA reads the flag once, when JAX first loads
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    sets_flag = [i for i, src in enumerate(code) if DEVICE_FLAG in src]
    if not sets_flag:
        return
    first = code[0].splitlines()
    assert sets_flag == [0], f"{path.name}: set {DEVICE_FLAG} in the first code cell only"
    flag_line = next(i for i, line in enumerate(first) if DEVICE_FLAG in line)
    jax_imports = [i for i, line in enumerate(first) if line.startswith(("import jax", "from jax"))]  # jaxlm too
    assert all(flag_line < i for i in jax_imports), f"{path.name}: {DEVICE_FLAG} is set after JAX is imported"
