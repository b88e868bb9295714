"""The wheel's version tag and torch requirement (setup.py's functions; no build here), and the
package's refusal of a torch older than the stable-ABI target it is built for."""

import importlib.util
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import rmask_kernels
from rmask_kernels.torch_target import TORCH_TARGET, check_torch_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    # Imported under another name, setup.py only defines its functions (setup() runs as __main__).
    spec = importlib.util.spec_from_file_location("rmask_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "cuda_version,tag",
    [("13.0", "cu13"), ("13.2.1", "cu13"), ("12.8", "cu12"), (None, "cpu")],
)
def test_local_version_tag_names_the_device_only(setup_py, cuda_version, tag):
    assert setup_py.local_version_tag(cuda_version) == tag
    version = Version(setup_py.package_version(cuda_version))
    assert version.local == tag and version.public == rmask_kernels.__version__


def test_torch_requirement_admits_every_release_from_the_target(setup_py):
    requirement = setup_py.torch_requirement()
    assert requirement == "torch>=%d.%d" % TORCH_TARGET
    specifier = SpecifierSet(requirement[len("torch"):])
    accepted = ["2.11.0", "2.11.0+cpu", "2.13.0+cpu", "2.14.1+cu130", "2.15.0", "3.0.0"]
    rejected = ["2.10.1", "2.10.0+cu128", "2.9.1"]
    assert all(specifier.contains(v) for v in accepted), requirement
    assert not any(specifier.contains(v) for v in rejected), requirement


def test_setup_and_package_read_one_target(setup_py):
    assert setup_py.torch_target() == TORCH_TARGET
    major, minor = TORCH_TARGET
    # TORCH_TARGET_VERSION as torch/csrc/stable/version.h spells a release: major << 56 | minor << 48.
    assert int(setup_py.torch_target_version_macro(), 16) == (major << 56) | (minor << 48)
    assert setup_py.torch_target_version_macro((2, 11)) == "0x020b000000000000"


@pytest.mark.parametrize("version", ["2.10.1", "2.10.0a0+git1234", "1.13.1+cu117"])
def test_an_older_torch_is_refused_naming_both_versions(version):
    with pytest.raises(ImportError) as error:
        check_torch_version(version)
    message = str(error.value)
    assert version in message and ">= %d.%d" % TORCH_TARGET in message and rmask_kernels.__version__ in message


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0+cpu", "2.14.1+cu130", "2.20.0.dev20270101"])
def test_the_target_and_later_torch_are_accepted(version):
    check_torch_version(version)


def test_import_refuses_an_older_torch(tmp_path):
    """The installed package, imported under a torch that reports an older release, stops at
    import with the clear error, before its extension is loaded."""
    code = (
        "import sys, torch\n"
        "torch.__version__ = '2.10.0'\n"
        "try:\n"
        "    import rmask_kernels\n"
        "except ImportError as error:\n"
        "    loaded = 'rmask_kernels._C' in sys.modules\n"
        "    print('refused', loaded, error)\n"
        "else:\n"
        "    print('imported')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if not result.stdout.startswith("refused"):
        pytest.fail(f"rmask_kernels imported under torch 2.10.0: {result.stdout}")
    assert result.stdout.startswith("refused False"), result.stdout
    assert "2.10.0" in result.stdout and ">= %d.%d" % TORCH_TARGET in result.stdout


def test_base_version_is_the_package_version(setup_py):
    assert setup_py.base_version() == rmask_kernels.__version__


def test_installed_metadata_names_this_build(setup_py):
    """The installed distribution (editable in .venv, the wheel in .venv-cuda) carries the
    dynamic version and dependencies setup.py computes for the torch here."""
    # Not the source tree's rmask_kernels.egg-info (left by whichever build ran last).
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    installed = list(metadata.distributions(name="rmask_kernels", path=paths))
    if not installed:
        pytest.skip("rmask_kernels is not installed")
    version = installed[0].version
    cuda = torch.version.cuda if Version(version).local.startswith("cu") else None
    assert version == setup_py.package_version(cuda)
    assert setup_py.torch_requirement() in (installed[0].requires or [])
