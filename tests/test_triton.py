"""The Triton backend's internals (rmask_kernels/triton): each kernel variant and launch policy
forced on the shapes that reach it (small blocks, many tiles, sparse backward forms, the
grad-weight partials budget), its registration, argument checks, backend resolution, the
kernels compiled for a GPU, and the GPU benchmark script. The op's contract on the Triton
backend (every geometry, mask, epilogue, layout, dtype) is tests/test_parity.py's.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them; ~0.5 ms per program, hence the tiny shapes);
with one, on CUDA tensors. The oracle runs in float64; fp32 kernels are compared at 1e-4 (only the
summation order and fp32 rounding differ)."""

import importlib.util
import pathlib
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the Makefile's DEPS pin it): no Triton backend to test")

import rmask_kernels as rk  # noqa: E402
import triton.language as tl  # noqa: E402
from rmask_kernels.triton import (  # noqa: E402
    backward, common, configs, forward_kernels, grad_input_kernels, grad_weight_kernels,
)
from rmask_kernels import reference  # noqa: E402
from rmask_kernels.functional import select_backend  # noqa: E402

from cases import check_against_reference, make_case  # noqa: E402
from helpers import python_subprocess  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# Mask modes and the kernel each takes with 32 output channels: spatial and group-of-16 the
# by-pattern forward (1 and 2 patterns), neuron the by-position one (groups == 1) or the
# all-positions one (groups > 1); so do small groups (group-of-2: test_small_blocks_many_tiles
# and the random configurations).
MODES = [("spatial", None), ("group", 16), ("neuron", None)]
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups), small: every program costs.
CONFIGS = [
    (2, 4, 8, 8, 32, 3, 1, 1, 1, 1),
    (2, 4, 9, 7, 32, 3, 2, 1, 1, 1),  # odd sizes, stride 2
    (1, 3, 8, 9, 32, (3, 5), (2, 1), (1, 2), 1, 1),  # rectangular kernel, mixed strides
    (2, 4, 8, 8, 32, 3, 1, 1, 2, 1),  # dilation
    (2, 4, 8, 8, 32, 1, 2, 0, 1, 1),  # 1x1 stride-2 projection shortcut
    (2, 4, 8, 8, 32, 3, 1, 1, 1, 2),  # groups: pattern blocks cut at group boundaries
    (2, 4, 7, 7, 32, 3, 1, 1, 1, 4),  # depthwise, multiplier 8
    (1, 3, 7, 6, 32, (2, 4), 1, "same", (2, 1), 1),  # asymmetric "same" (padded by the caller)
]


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 kernels in strict fp32 (they follow cudnn.allow_tf32, as F.conv2d does; its
    default, True, would leave TF32's ~1e-3 error): matters on a GPU only."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def case(config, mode, group_size, ratio=0.5, dtype=torch.float32, bias=True):
    x, weight, b, mask, conv_args = make_case(config, mode, group_size, ratio, dtype, bias)
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return move(x), move(weight), move(b), move(mask), conv_args


FALLBACK_WARNING = "rmask_kernels: backend="


def triton(*args, **kwargs):
    with warnings.catch_warnings():
        # A fallback to the reference would warn: fail instead (other warnings, e.g. triton's
        # own when it compiles for a GPU, stay warnings).
        warnings.filterwarnings("error", message=FALLBACK_WARNING)
        return rk.masked_conv2d(*args, backend="triton", **kwargs)


def check_forward_and_backward(x, weight, bias, mask, conv_args, tolerance=TOLERANCE, **kwargs):
    return check_against_reference(triton, x, weight, bias, mask, conv_args, tolerance=tolerance, **kwargs)


@pytest.mark.parametrize("mode,group_size", MODES + [("group", 2)], ids=str)
def test_small_blocks_many_tiles(monkeypatch, mode, group_size):
    # Blocks of 16 and weight chunks of 32 rows: many row tiles per pattern (the tile search
    # across patterns), several channel blocks per position, input-channel blocks (20 > 16)
    # and a multi-chunk grad-weight reduction.
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", configs.Config(16, 16, 16, 4, 1))
    monkeypatch.setattr(backward, "WEIGHT_CHUNK", 32)
    check_forward_and_backward(*case((2, 20, 5, 6, 48, 3, 1, 1, 1, 1), mode, group_size and group_size * 3 // 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("config", CONFIGS[1:], ids=str)
def test_grad_input_by_tap(monkeypatch, config, layout):
    # Spatial masks up to SPARSE_BACKWARD_MAX_KEEP take the per-tap grad input (forced here
    # at keep 0.5; the parity tests above take it only at ratio 0.9): every geometry.
    monkeypatch.setattr(backward, "SPARSE_BACKWARD_MAX_KEEP", 1.0)
    x, weight, bias, mask, conv_args = case(config, "spatial", None)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_forward_and_backward(x, weight, bias, mask, conv_args)


@pytest.mark.parametrize("sparse_backward", [False, True], ids=["dense-backward", "sparse-backward"])
@pytest.mark.parametrize("config,mode,group_size", [(CONFIGS[1], "spatial", None), (CONFIGS[1], "neuron", None),
                                                    (CONFIGS[5], "group", 2)], ids=str)
def test_int32_offsets(monkeypatch, config, mode, group_size, sparse_backward):
    # The offsets a GPU computes in int32 for tensors below 2**31 elements; the interpreter
    # computes them in int64 unless told otherwise (common.INTERPRETER_WIDE). Every forward
    # kernel (by pattern, by position, all positions), grad-input and grad-weight variant.
    monkeypatch.setattr(common, "INTERPRETER_WIDE", False)
    if sparse_backward:
        monkeypatch.setattr(backward, "SPARSE_BACKWARD_MAX_KEEP", 1.0)
    x, weight, bias, mask, conv_args = case(config, mode, group_size)
    assert common.index_type(x, weight, mask) == tl.int32
    check_forward_and_backward(x, weight, bias, mask, conv_args)


@pytest.mark.parametrize("config,mode,group_size", [(CONFIGS[1], "neuron", None), (CONFIGS[3], "group", 4)], ids=str)
def test_sparse_backward_by_position(monkeypatch, config, mode, group_size):
    # Neuron-like masks (groups == 1) up to SPARSE_BACKWARD_MAX_KEEP take the by-position grad
    # input and the (position, channel)-pair grad weight (forced here at keep 0.5; ratio 0.9
    # takes them unforced).
    monkeypatch.setattr(backward, "SPARSE_BACKWARD_MAX_KEEP", 1.0)
    check_forward_and_backward(*case(config, mode, group_size))


# Gradients in low precision: relative to their largest entry, within a few roundings of the
# dtype (eps: 2^-8 bf16, 2^-11 fp16).
GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["spatial", "neuron"])
def test_sparse_backward_low_precision(mode, dtype):
    # Ratio 0.9: the sparse backward without forcing (by tap into an fp32 buffer; by position
    # and pairs), each rounding to the dtype once.
    x, weight, _, mask, conv_args = case(CONFIGS[1], mode, None, 0.9)
    x, weight = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    grad_y = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=DEVICE)
    got = torch.autograd.grad(triton(x, weight, None, mask, **conv_args), [x, weight], grad_y.to(dtype))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    want = torch.autograd.grad(reference.masked_conv2d(x64, w64, None, mask, **conv_args), [x64, w64],
                               grad_y.to(dtype).double())
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= GRAD_TOLERANCE[dtype] * r.abs().max()


def test_grad_weight_chunks_follow_the_partials_budget(monkeypatch):
    # A budget of 4 chunks of partials for 3 patterns (the grid bound adds one per pattern):
    # each pattern's rows in one chunk, however many rows.
    x, weight, bias, mask, conv_args = case((3, 4, 8, 8, 48, 3, 1, 1, 1, 1), "group", 16)
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", configs.INTERPRETER_CONFIG._replace(block_m=16))
    monkeypatch.setattr(backward, "WEIGHT_CHUNK", 16)
    monkeypatch.setattr(backward, "PARTIAL_BUDGET_BYTES", 4 * 4 * 48 * 36)
    check_forward_and_backward(x, weight, bias, mask, conv_args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["spatial", "neuron"])
def test_conv_bn_unit_matches_the_reference_backend(mode, training):
    # The paper's unit end to end: BN over the kept outputs from the fused statistics when
    # training, folded BN + residual + ReLU in the epilogue in eval mode.
    torch.manual_seed(0)
    units = [rk.MaskedConvBN2d(3, 16, 3, padding=1, mask_ratio=0.6, mask_mode=mode, seed=1, output_size=(6, 5),
                               backend=backend, activation="relu", bn_stats="kept").to(DEVICE)
             for backend in ("triton", "reference")]
    units[1].load_state_dict(units[0].state_dict())
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    residual = torch.randn(2, 16, 6, 5, device=DEVICE)
    outputs, grads = [], []
    for unit in units:
        unit.train(training)
        xs = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=FALLBACK_WARNING)
            y = unit(xs, residual=residual) if not training else unit(xs)
        outputs.append(y)
        grads.append(torch.autograd.grad(y, [xs, unit.conv.weight], torch.ones_like(y)))
    torch.testing.assert_close(outputs[0], outputs[1], **TOLERANCE)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    if training:
        torch.testing.assert_close(units[0].bn.running_var, units[1].bn.running_var, **TOLERANCE)


def test_deterministic_bit_identical_runs(monkeypatch):
    monkeypatch.setattr(backward, "WEIGHT_CHUNK", 1)  # chunks of one row block: several grad-weight partials
    x, weight, bias, mask, conv_args = case((3, 4, 9, 9, 32, 3, 1, 1, 1, 1), "group", 16)
    runs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        y, total, squares = triton(xs, ws, bs, mask, channel_stats=True, **conv_args)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE))
        runs.append((y.detach(), total, squares, xs.grad, ws.grad, bs.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_backend_resolution():
    x, weight, bias, mask, conv_args = case(CONFIGS[0], "neuron", None, 0.9)
    assert "triton" in rk.available_backends()
    assert select_backend("triton", x, mask) == "triton"
    if DEVICE == "cpu":
        # The interpreter serves "triton" when asked; "auto" on CPU tensors stays on the CPU path.
        assert rk.backends.resolve_backend("auto", x) == "cpu"
        assert select_backend("auto", x, mask) != "triton"
        with pytest.warns(RuntimeWarning, match="backend='triton' runs float32, float16 and bfloat16"):
            assert select_backend("triton", x.double(), mask) == "reference"
    else:
        assert select_backend("auto", x, mask) == "triton"
        # Nothing masked: dense conv x mask (cuDNN).
        assert select_backend("auto", x, torch.ones_like(mask)) == "reference"


def test_registration_imports_no_triton_and_cpu_needs_the_interpreter():
    code = (
        "import sys, torch, warnings, rmask_kernels as rk\n"
        "assert 'triton' not in sys.modules, 'registering the Triton ops imported triton'\n"
        "m = rk.random_mask((4, 6, 6), 0.5); x = torch.randn(1, 3, 6, 6); w = torch.randn(4, 3, 3, 3)\n"
        "try:\n"
        "    torch.ops.rmask.triton_masked_conv2d(x, w, None, m, *rk.kept_index(m), [1, 1], [1, 1], [1, 1], 1)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = rk.masked_conv2d(x, w, None, m, padding=1, backend='triton')\n"
        "print(caught[0].message)\n"
        "assert torch.allclose(y, torch.nn.functional.conv2d(x, w, None, 1, 1) * m)\n"
    )
    result = python_subprocess(["-c", code], env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run on CPU tensors only in Triton's interpreter; set TRITON_INTERPRET=1" in result.stdout
    assert "backend='triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)" in result.stdout


def test_triton_backend_without_the_extension():
    # A GPU user without a C++ toolchain: no rmask_kernels._C, yet the triton_ ops are defined
    # (from rmask_kernels/schemas.py) and serve, with their fake kernels and autograd. The
    # subprocess imports the package under test (PYTHONPATH, run outside any source tree).
    code = (
        "import sys, warnings; sys.modules['rmask_kernels._C'] = None\n"
        "import torch, rmask_kernels as rk\n"
        "print(rk.__file__)\n"
        "assert rk.available_backends() == ['reference', 'triton'], rk.available_backends()\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 3, 6, 6, requires_grad=True); w = torch.randn(4, 3, 3, 3, requires_grad=True)\n"
        "m = rk.random_mask((4, 6, 6), 0.5, 'neuron')\n"
        "with warnings.catch_warnings():\n"
        "    warnings.filterwarnings('error', message='rmask_kernels: backend=')\n"
        "    y = rk.masked_conv2d(x, w, None, m, padding=1, backend='triton')\n"
        "expected = torch.nn.functional.conv2d(x, w, None, 1, 1) * m\n"
        "torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)\n"
        "grad_y = torch.randn_like(expected)\n"
        "for got, want in zip(torch.autograd.grad(y, [x, w], grad_y), torch.autograd.grad(expected, [x, w], grad_y)):\n"
        "    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    result = python_subprocess(["-c", code], env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.splitlines() == [rk.__file__, "ok"], result.stdout


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, w, m: (x.double(), w.double(), m), "take float32, float16 or bfloat16 input, got torch.float64"),
        (lambda x, w, m: (x, w.half(), m), "weight dtype must match input dtype torch.float32, got torch.float16"),
        (lambda x, w, m: (x, w, m[:, :5]), r"mask must be bool of shape \(6 or 1, 6, 6\)"),
    ],
    ids=["float64", "weight dtype", "mask shape"],
)
def test_op_rejects_bad_arguments(change, match):
    x, weight, mask = torch.randn(1, 3, 6, 6), torch.randn(6, 3, 3, 3), rk.random_mask((6, 6, 6), 0.5)
    index = rk.kept_index(mask)
    x, weight, mask = (t.to(DEVICE) for t in change(x, weight, mask))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rmask.triton_masked_conv2d(x, weight, None, mask, *(t.to(DEVICE) for t in index),
                                             [1, 1], [1, 1], [1, 1], 1)


@pytest.mark.cuda
def test_torch_compile_cuda():
    # fullgraph: no graph break around the op nor in auto's choice of triton.
    layer = rk.MaskedConv2d(4, 32, 3, padding=1, mask_ratio=0.9, output_size=(8, 8), backend="auto").cuda()
    x = torch.randn(2, 4, 8, 8, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    expected = reference.masked_conv2d(x, layer.weight, layer.bias, layer.mask, padding=1)
    (want,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
def test_benchmark_shapes_cuda(mode, group_size):
    # One of the benchmark shapes (docs/design.md) at full size, fp32 in strict precision (TF32 off on both sides:
    # the strict_fp32 fixture); sums of 576 products, hence the looser tolerance.
    x, weight, bias, mask, conv_args = case((8, 64, 32, 32, 64, 3, 1, 1, 1, 1), mode, group_size, 0.7)
    check_forward_and_backward(x, weight, bias, mask, conv_args, tolerance=dict(rtol=1e-3, atol=1e-3))


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_a_gpu_without_spilling(arch, wide):
    # The interpreter never lowers the kernels: compile each (bf16 and strict fp32, the most
    # demanding variants, every config of configs.CONFIGS, or of WIDE_CONFIGS with int64
    # offsets) for sm_80 and sm_90 (no GPU needed),
    # in a process where they are defined for the GPU, and require 0 bytes of stack: no kernel
    # spills registers. Triton's cache (keyed by the kernels' source) makes a rerun of unchanged
    # kernels quick; a changed kernel compiles again.
    result = python_subprocess([str(ROOT / "tests" / "triton_compile.py"), "--arch", str(arch), "--max-stack", "0"]
                               + (["--wide"] if wide else []),
                               env={"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " regs=" in line]
    assert all(f" sm_{arch} " in line and " stack=0 " in line for line in lines), lines
    kernels = {name for module in (forward_kernels, grad_input_kernels, grad_weight_kernels)
               for name in dir(module) if name.endswith("_kernel")}
    assert {line.split()[0] for line in lines} == kernels
    for family in configs.FAMILIES:
        for dtype, operands in (("bf16", "16bit"), ("fp32", "fp32")):
            for config in configs.candidates(family, operands, wide):
                assert any(line.split()[1] == dtype and f"[{config}]" in line for line in lines), (family, config)
    assert result.stdout.rstrip().endswith("ok")


def test_rule_picks_per_shape_class(monkeypatch):
    # On a GPU without measuring: the set's first config, the smallest block_m for short row
    # ranges; in the interpreter its own config.
    monkeypatch.setattr(configs, "INTERPRET", False)
    for family, sets in configs.CONFIGS.items():
        for operands, candidates in sets.items():
            assert configs.rule(family, operands, 10**6) == candidates[0]
            short = configs.rule(family, operands, candidates[0].block_m // 2 - 1)
            assert short == min(candidates, key=lambda config: (config.block_m, config.num_warps)) != candidates[0]
            assert configs.rule(family, operands, 10**6, wide=True) == configs.WIDE_CONFIGS[family][operands][0]
    monkeypatch.setattr(configs, "INTERPRET", True)
    assert configs.rule("forward", "fp32", 10**6) == configs.INTERPRETER_CONFIG


def test_operand_classes():
    assert configs.operand_class(torch.bfloat16, "ieee") == configs.operand_class(torch.float16, "tf32") == "16bit"
    assert configs.operand_class(torch.float32, "tf32") == "tf32"
    assert configs.operand_class(torch.float32, "ieee") == "fp32"


def test_tuning_is_off_without_a_gpu_or_when_asked(monkeypatch):
    assert not configs.tuning()  # the interpreter (or a GPU with RMASK_TRITON_AUTOTUNE=0) never measures
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setenv("RMASK_TRITON_AUTOTUNE", "0")
    assert not configs.tuning()
    monkeypatch.setenv("RMASK_TRITON_AUTOTUNE", "1")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not configs.tuning()  # a measured choice could differ between processes
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert configs.tuning() == torch.cuda.is_available()


@pytest.mark.parametrize("mode,families", [("spatial", ("forward", "grad_input", "grad_weight")),
                                           ("neuron", ("forward", "grad_input", "grad_weight_pairs"))])
def test_autotune_measures_every_config_once_per_shape(monkeypatch, mode, families):
    # Tuning forced on (the interpreter runs the GPU sets): every config of each family's set
    # is launched and timed once per call shape, the fastest (here: by the fake clock, the last
    # one measured) is cached and used, and the results stay exact. The sparse backward (keep
    # 0.5 forced) takes the by-tap / by-position grad input and the pairs grad weight.
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setattr(configs, "_chosen", {})
    monkeypatch.setattr(backward, "SPARSE_BACKWARD_MAX_KEEP", 1.0)
    measured = []

    def measure(launch):
        launch()
        measured.append(len(measured))
        return -len(measured)  # later launches "faster": the set's last config wins

    monkeypatch.setattr(configs, "measure", measure)
    x, weight, bias, mask, conv_args = case(CONFIGS[1], mode, None)
    check_forward_and_backward(x, weight, bias, mask, conv_args)
    operands = configs.operand_class(torch.float32, "ieee")
    expected = sum(len(configs.CONFIGS[family][operands]) for family in families)
    assert len(measured) == expected
    assert sorted(key[0] for key in configs._chosen) == sorted(families)
    assert all(config == configs.CONFIGS[key[0]][operands][-1] for key, config in configs._chosen.items())
    assert sorted(configs.chosen().values()) == sorted(str(config) for config in configs._chosen.values())
    check_forward_and_backward(x, weight, bias, mask, conv_args)  # same shapes: cached
    assert len(measured) == expected
    check_forward_and_backward(x[:1], weight, bias, mask, conv_args)  # another batch: measured again
    assert len(measured) == 2 * expected


def test_index_type_from_the_largest_offset(monkeypatch):
    # int32 offsets unless an offset into some tensor reaches 2**31 (meta tensors: no memory).
    monkeypatch.setattr(common, "INTERPRETER_WIDE", False)
    small = torch.empty(2, 3, 4, 5, device="meta")
    assert common.index_type(small, None, torch.empty(0, device="meta")) == tl.int32
    assert common.index_type(small, torch.empty(2**31, device="meta")) == tl.int64
    assert common.index_type(torch.empty(2**31 - 1, device="meta")) == tl.int32
    # Offsets reach past numel through strides: a view of a larger tensor (1 + 1 * 2**31).
    assert common.index_type(torch.empty_strided((2, 1), (2**31, 1), device="meta")) == tl.int64


def test_gpu_benchmark_table():
    # The script's table and defaults, without a GPU: ratios as docs/design.md defines them.
    spec = importlib.util.spec_from_file_location("gpu_times", ROOT / "benchmarks" / "gpu_times.py")
    gpu_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_times)
    args = gpu_times.parse_args([])
    assert args.keeps == [0.1, 0.3, 0.5, 0.7, 1.0] and args.batches == [32, 128]
    assert set(args.modes) == {"spatial", "neuron"} and set(args.dtypes) == {"float32", "bfloat16"}
    row = dict(shape="64->64@32 s1", batch=32, mode="spatial", dtype="float32", keep=0.1, ms=dict(
        dense=1.0, baseline=1.2, triton=0.3), **{"pass": "fwd"})
    last = gpu_times.markdown([row], ["triton"]).splitlines()[-1]
    assert last == "| 64->64@32 s1 | 32 | spatial | float32 | 0.1 | fwd | 1.200 | 0.300 | 4.00x | 3.00 |"


def test_gpu_benchmark_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the benchmark")
    result = python_subprocess([str(ROOT / "benchmarks" / "gpu_times.py")])
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stderr
