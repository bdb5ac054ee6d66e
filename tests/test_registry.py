"""The shared registry and the public API surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

import robustlab
from robustlab.errors import UnknownNameError
from robustlab.registry import Registry, check_kwargs


def test_register_get_and_suggest():
    reg: Registry = Registry("widget")

    @reg.register("alpha")
    def alpha():
        """The first widget."""

    assert reg.get("alpha") is alpha and "alpha" in reg and len(reg) == 1
    assert reg.summary("alpha") == "The first widget."
    with pytest.raises(
        UnknownNameError, match=r"unknown widget 'alpa'; did you mean 'alpha'.*available: alpha"
    ):
        reg.get("alpa")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(alpha)


def test_check_kwargs():
    def build(a, *, beta=1):
        return a, beta

    check_kwargs(build, {"beta": 2}, "thing")
    with pytest.raises(UnknownNameError, match="thing has no option 'bta'; did you mean 'beta'"):
        check_kwargs(build, {"bta": 2}, "thing")
    check_kwargs(lambda **kw: kw, {"anything": 1}, "open")  # **kwargs accepts all


def test_every_public_name_resolves():
    for name in robustlab.__all__:
        assert getattr(robustlab, name) is not None, name


def test_import_has_no_device_side_effects():
    code = (
        "import torch, robustlab, robustlab.train, robustlab.data, robustlab.models;"
        "assert not torch.cuda.is_initialized();"
        "assert torch.get_default_dtype() == torch.float32;"
        "import torch.distributed as d; assert not d.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "robustlab", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"robustlab {robustlab.__version__}"
