"""Importing robustlab has no global side effects (DESIGN.md, contract 7).

Each check runs ``import robustlab`` (and its subpackages) in a fresh interpreter and
compares the global state before and after. ``test_the_probe_sees_each_side_effect``
plants every side effect on purpose to show that each comparison can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

IMPORTS = """
import robustlab
import robustlab.attacks, robustlab.train, robustlab.certify, robustlab.evaluate
import robustlab.data, robustlab.nn
"""

# Torch and numpy are imported first: the probe measures what robustlab itself changes.
PROBE = """
import json, logging, os, random, sys
import numpy as np
import torch

def state():
    root = logging.getLogger()
    return {
        "torch_rng": torch.get_rng_state().tolist(),
        "numpy_rng": repr(np.random.get_state()),
        "python_rng": repr(random.getstate()),
        "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        "root_logger": [root.level, [repr(h) for h in root.handlers]],
        "environ": dict(os.environ),
        "default_dtype": str(torch.get_default_dtype()),
        "cuda_initialized": torch.cuda.is_initialized(),
    }

before = state()
{imports}
after = state()
print(json.dumps({k: before[k] != after[k] for k in before}))
"""

CHECKS = ["torch_rng", "numpy_rng", "python_rng", "threads", "root_logger", "environ",
          "default_dtype", "cuda_initialized"]  # fmt: skip


def _changed(imports: str) -> dict[str, bool]:
    code = PROBE.replace("{imports}", textwrap.dedent(imports))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def changed() -> dict[str, bool]:
    return _changed(IMPORTS)


@pytest.mark.parametrize("what", CHECKS)
def test_import_leaves_global_state_alone(changed, what):
    assert set(changed) == set(CHECKS)
    assert not changed[what], f"importing robustlab changes {what}"


def test_the_probe_sees_each_side_effect():
    planted = """
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.set_num_threads(torch.get_num_threads() + 1)
    logging.basicConfig(level=logging.INFO)
    os.environ["ROBUSTLAB_PLANTED"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.cuda._initialized = True  # what torch.cuda.init() leaves behind on a GPU machine
    """
    assert _changed(planted) == dict.fromkeys(CHECKS, True)
