"""The compiled extension reaches libtorch only through the stable C shim: none of its
undefined symbols is a C++ symbol of ATen, c10 or torch (which would tie it to one torch
release). Run on the extension this Python imports (the installed build under test)."""

import os
import re
import shutil
import subprocess

import pytest

from rmask_kernels import ops

LIBTORCH_CPP = re.compile(r"\b(at|c10|torch)::")


def undefined_symbols(path):
    result = subprocess.run(["nm", "-D", "--undefined-only", "-C", path], capture_output=True, text=True, check=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def extension_symbols():
    if not ops.extension_loaded():
        pytest.skip(f"the extension is not built: {ops.EXTENSION_ERROR}")
    if shutil.which("nm") is None:
        pytest.fail("nm (binutils) is needed to read the extension's symbols")
    from rmask_kernels import _C

    return undefined_symbols(_C.__file__)


def test_no_libtorch_cpp_symbol_is_undefined(extension_symbols):
    cpp = [line for line in extension_symbols if LIBTORCH_CPP.search(line)]
    assert not cpp, "the extension needs C++ symbols of libtorch:\n" + "\n".join(cpp[:20])


def test_it_calls_the_stable_shim(extension_symbols):
    # The symbols it does take from torch are the C shim's (aoti_torch_*, torch_*).
    assert any(re.search(r"\b(aoti_torch|torch)_\w+$", line) for line in extension_symbols), extension_symbols[:20]


def test_the_package_under_test_is_the_installed_one():
    """make abi-check sets RMASK_TEST_INSTALLED=1: its tests must exercise the wheel installed in
    that venv, never the source tree's build."""
    if os.environ.get("RMASK_TEST_INSTALLED") != "1":
        pytest.skip("only under make abi-check (RMASK_TEST_INSTALLED=1)")
    import rmask_kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.dirname(os.path.abspath(rmask_kernels.__file__))
    assert package != os.path.join(root, "rmask_kernels"), package
    assert os.path.basename(os.path.dirname(package)) == "site-packages", package
