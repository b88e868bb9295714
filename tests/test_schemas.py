"""The Python copy of the op schemas (rmask_kernels/schemas.py, which defines the triton_ family
when the extension is not built) against those the compiled library registers from
csrc/masked_conv2d_schemas.h: the two must stay the same text."""

import pytest
import torch

import rmask_kernels as rk
from rmask_kernels import schemas


@pytest.mark.skipif(not rk.ops.extension_loaded(), reason="extension not built: no C++ schemas to compare")
@pytest.mark.parametrize("prefix", rk.ops.FAMILIES)
@pytest.mark.parametrize("schema", schemas.SCHEMAS, ids=lambda schema: schema.split("(")[0])
def test_python_schemas_equal_the_compiled_ones(prefix, schema):
    name = prefix + schema.split("(")[0]
    registered = getattr(torch.ops.rmask, name).default._schema
    assert str(registered) == str(torch._C.parse_schema(f"rmask::{prefix}{schema}"))
    assert str(registered) == f"rmask::{prefix}{schema}"


@pytest.mark.skipif(not rk.ops.extension_loaded(), reason="extension not built: no C++ schemas to compare")
def test_every_compiled_triton_op_has_a_python_schema():
    compiled = {schema.name for schema in torch._C._jit_get_all_schemas() if schema.name.startswith("rmask::triton_")}
    assert compiled == {"rmask::triton_" + schema.split("(")[0] for schema in schemas.SCHEMAS}
