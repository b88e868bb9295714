"""The compiled extension reaches libtorch only through the stable C shim: none of its
undefined symbols is a C++ symbol of ATen, c10 or torch (which would tie it to one torch
release). Run on the extension this Python imports (the installed build under test)."""

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
