"""The wheel's version tag and torch requirement (setup.py's functions; no build here)."""

import importlib.util
import os
import sys
from importlib import metadata

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import rmask_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    # Imported under another name, setup.py only defines its functions (setup() runs as __main__).
    spec = importlib.util.spec_from_file_location("rmask_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "torch_version,cuda_version,tag",
    [
        ("2.14.1+cu130", "13.0", "cu130torch2.14"),
        ("2.13.0+cpu", None, "cputorch2.13"),
        ("2.13.0", None, "cputorch2.13"),
        ("2.9.1+cu128", "12.8", "cu128torch2.9"),
        ("2.10.0a0+git1234", "12.6.3", "cu126torch2.10"),
    ],
)
def test_local_version_tag(setup_py, torch_version, cuda_version, tag):
    assert setup_py.local_version_tag(torch_version, cuda_version) == tag
    version = Version(setup_py.package_version(torch_version, cuda_version))
    assert version.local == tag and version.public == rmask_kernels.__version__


@pytest.mark.parametrize(
    "torch_version,accepted,rejected",
    [
        ("2.14.1+cu130", ["2.14.0", "2.14.1+cu130", "2.14.2+cu128"], ["2.13.0", "2.15.0", "2.15.0.dev20260101"]),
        ("2.13.0+cpu", ["2.13.0+cpu", "2.13.1"], ["2.12.1", "2.14.0"]),
    ],
)
def test_torch_requirement_pins_the_minor_release(setup_py, torch_version, accepted, rejected):
    requirement = setup_py.torch_requirement(torch_version)
    assert requirement.startswith("torch")
    specifier = SpecifierSet(requirement[len("torch"):])
    assert all(specifier.contains(v) for v in accepted), requirement
    assert not any(specifier.contains(v, prereleases=True) for v in rejected), requirement


def test_base_version_is_the_package_version(setup_py):
    assert setup_py.base_version() == rmask_kernels.__version__


def test_installed_metadata_names_this_torch(setup_py):
    """The installed distribution (editable in .venv, the wheel in .venv-cuda) carries the
    dynamic version and dependencies setup.py computes for the torch here."""
    # Not the source tree's rmask_kernels.egg-info (left by whichever build ran last).
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    installed = list(metadata.distributions(name="rmask_kernels", path=paths))
    if not installed:
        pytest.skip("rmask_kernels is not installed")
    version = installed[0].version
    cuda = torch.version.cuda if Version(version).local.startswith("cu") else None
    assert version == setup_py.package_version(torch.__version__, cuda)
    assert setup_py.torch_requirement(torch.__version__) in (installed[0].requires or [])
