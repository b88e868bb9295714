# Everything installs into .venv. torch goes in FIRST, from TORCH_SPEC, so that nothing
# installed after it can pull a (multi-GB) CUDA build; a GPU server passes its own, e.g.
#   make install TORCH_SPEC="torch==2.14.1"
# Each step is stamped: re-running `make install` with nothing changed does nothing.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --quiet --disable-pip-version-check
# triton: needed to test the Triton backend's kernels (rmask_kernels/triton) on CPU tensors in
# its interpreter (TRITON_INTERPRET=1, tests/test_triton.py). Pinned: the interpreter quirks the
# kernels work around (bf16 tl.dot, bf16 rounding) are this release's. A CUDA torch build pins
# its own triton: pass that one, e.g. make install TORCH_SPEC=... TRITON_SPEC="triton==X.Y.Z".
TRITON_SPEC ?= triton==3.9.0
DEPS       := numpy ninja pytest pytest-benchmark hypothesis scikit-learn setuptools wheel tqdm foolbox==3.3.4 matplotlib \
              $(TRITON_SPEC)
TORCH_TAG  := $(shell printf '%s' '$(TORCH_SPEC)' | md5sum | cut -c1-10)
SOURCES    := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: install test demo bench bench-gpu clean cmake-check wheel wheel-cuda cuda-check cmake-check-cuda abi-check \
        triton-compat

install: $(VENV)/.stamp-build

$(VENV)/.stamp-torch-$(TORCH_TAG):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.stamp-torch-* $(VENV)/.stamp-deps
	$(PIP) install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-torch-$(TORCH_TAG) Makefile
	$(PIP) install $(DEPS)
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import rmask_kernels as rk; assert 'cpu' in rk.available_backends(), rk.available_backends()"
	touch $@

# The C++ library check first, so pytest's summary is the last line.
test: install cmake-check
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: install
	$(PY) -m rmask_kernels.demo

# Speed of the kernels vs F.conv2d * mask and of the whole model (a few minutes); JSON with
# machine, torch version and date in benchmarks/results/, then the markdown ratio table.
BENCH_JSON ?= benchmarks/results/latest.json
bench: install
	mkdir -p $(dir $(BENCH_JSON))
	$(PY) -m pytest benchmarks/bench_masked_conv2d.py benchmarks/bench_input_sparsity.py benchmarks/bench_resnet18.py -q -o python_files='bench_*.py' \
	  -p no:cacheprovider --benchmark-json=$(BENCH_JSON) --benchmark-columns=median,iqr --benchmark-sort=name $(BENCH_ARGS)
	$(PY) benchmarks/report.py $(BENCH_JSON) | tee $(BENCH_JSON:.json=.md)

# GPU speed of the triton and cuda backends vs cuDNN F.conv2d * mask (the target shapes and
# keep fractions of docs/design.md, fp32 with TF32 off and bf16, fwd and fwd+bwd): JSON and the
# markdown ratio table in benchmarks/results/. Needs a CUDA device (says so and fails without one).
GPU_BENCH_JSON ?= benchmarks/results/gpu_latest.json
bench-gpu: install
	$(PY) benchmarks/gpu_times.py --json $(GPU_BENCH_JSON) $(BENCH_ARGS)

# Build the C++ library against LibTorch with CMake, as C++ users do (no Python involved).
# A cp310-abi3 wheel in dist/, built on LibTorch's stable ABI (rmask_kernels/torch_target.py):
# CPU-only with a CPU torch (0.1.0+cpu), CUDA kernels for TORCH_CUDA_ARCH_LIST (default
# 8.0;9.0+PTX) with a CUDA torch (0.1.0+cu13); either requires torch >= the target release, and
# serves every torch from it on (make abi-check proves it for two releases).
wheel: $(VENV)/.stamp-deps
	$(PY) setup.py --version
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

cmake-check: install
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	cd build/cmake && ctest --output-on-failure

# ---------------------------------------------------------------------------------------
# CUDA, without a GPU: a second venv with the CUDA build of torch (.venv-cuda, stamped like
# .venv) in which the extension is compiled and linked with the machine's nvcc for
# CUDA_ARCH_LIST, imported, and the kernels' arithmetic checked on the host (tests/cuda).
CUDA_VENV       ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME       ?= /usr/local/cuda
CUDA_ARCH_LIST  ?= 8.0;9.0+PTX
CUDA_PY         := $(CUDA_VENV)/bin/python
CUDA_PIP        := $(CUDA_PY) -m pip --quiet --disable-pip-version-check
CUDA_DEPS       := numpy ninja pytest hypothesis setuptools wheel tqdm "cmake>=3.26,<4"
CUDA_TORCH_TAG  := $(shell printf '%s' '$(CUDA_TORCH_SPEC)' | md5sum | cut -c1-10)
# torch's pip CUDA packages (nvidia/cu13) carry the cuBLAS/cuSPARSE headers ATen's CUDA headers
# include, and nvrtc; torch.utils.cpp_extension looks in /usr/local unless CUDA_HOME says otherwise.
CUDA_NVIDIA      = $$($(abspath $(CUDA_PY)) -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
CUDA_ENV         = CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH_LIST)" MAX_JOBS=2 \
                   CPATH="$(CUDA_NVIDIA)/include$${CPATH:+:$$CPATH}"

$(CUDA_VENV)/.stamp-torch-$(CUDA_TORCH_TAG):
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	rm -f $(CUDA_VENV)/.stamp-*
	$(CUDA_PIP) install "$(CUDA_TORCH_SPEC)"
	touch $@

$(CUDA_VENV)/.stamp-deps: $(CUDA_VENV)/.stamp-torch-$(CUDA_TORCH_TAG) Makefile
	$(CUDA_PIP) install $(CUDA_DEPS)
	touch $@

# The CUDA wheel, built by the CUDA torch of .venv-cuda in its own build folder (build/cuda).
wheel-cuda: $(CUDA_VENV)/.stamp-deps
	$(CUDA_ENV) RMASK_BUILD_BASE=build/cuda $(CUDA_PY) setup.py --version
	$(CUDA_ENV) RMASK_BUILD_BASE=build/cuda $(CUDA_PIP) wheel --no-build-isolation --no-deps -w dist .

# Build, link and import the CUDA extension; check its kernels are registered, its SASS/PTX
# and metadata (tests/cuda/check_cuda_build.py); run the parity suite on the CUDA kernels'
# element functions on the host (backend cuda-emulation: their arithmetic, not launches), on
# the CPU kernels and the reference with this torch (not the CPU kernels' rerun under AVX2 nor
# the Triton interpreter: make test runs both), and on CUDA tensors where a GPU is present;
# the Triton kernels compiled for sm_80 and sm_90 by the Triton this CUDA torch pins (3.8 for
# torch 2.14: what GPU users run; make test compiles them with the pinned 3.9); and the CMake
# build with CUDA. Run from build/ or with the venv's pytest, never `python -m`, so the
# installed wheel is imported, not the source tree.
cuda-check: wheel-cuda
	$(CUDA_PIP) install --no-deps --force-reinstall "$$(ls -t dist/rmask_kernels-*+cu*-abi3-*.whl | head -1)"
	cd build && $(CUDA_ENV) $(abspath $(CUDA_PY)) ../tests/cuda/check_cuda_build.py
	$(CUDA_ENV) $(CUDA_PY) tests/cuda/build_host_emulation.py
	RMASK_PARITY_BACKENDS=reference,cpu,cuda,cuda-emulation $(CUDA_VENV)/bin/pytest -q -p no:cacheprovider \
	  tests/cuda tests/test_parity.py tests/test_functional.py tests/test_cpu_kernels.py tests/test_schemas.py \
	  tests/test_wheel_version.py -k "not avx2" $(PYTEST_ARGS)
	$(CUDA_VENV)/bin/pytest -q -p no:cacheprovider tests/test_triton.py -k "compile_for_a_gpu" $(PYTEST_ARGS)
	$(MAKE) cmake-check-cuda

# The LibTorch (CMake) build with the CUDA kernels (-DRMASK_WITH_CUDA=ON) against .venv-cuda's
# torch, and its C++ test: CMake >= 3.26 (pip's) for nvcc's C++20, nvrtc from torch's packages.
cmake-check-cuda: $(CUDA_VENV)/.stamp-deps
	$(CUDA_ENV) $(CUDA_VENV)/bin/cmake -S . -B build/cmake-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DRMASK_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
	  -DCUDA_nvrtc_LIBRARY="$$(ls $(CUDA_NVIDIA)/lib/libnvrtc.so.* | head -1)" \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(CUDA_VENV))/bin/ninja \
	  -DCMAKE_PREFIX_PATH="$$($(CUDA_PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(CUDA_ENV) $(CUDA_VENV)/bin/cmake --build build/cmake-cuda
	cd build/cmake-cuda && $(abspath $(CUDA_VENV))/bin/ctest --output-on-failure
	$(CUDA_ENV) $(CUDA_PY) tests/cuda/check_cuda_build.py --library build/cmake-cuda/librmask_kernels.so

# One CPU wheel, two torch releases: build it ONCE against .venv's torch (2.13), install that
# same file into .venv-cuda (torch 2.14) and run the CPU op and layer tests there, from the
# installed package (the venv's pytest, not `python -m`, so the source tree is not imported);
# tests/test_stable_abi.py reads the installed extension's undefined symbols (no at::, c10::,
# torch:: symbol). make cuda-check afterwards reinstalls the CUDA wheel there.
ABI_WHEEL_DIR ?= build/abi-wheel
abi-check: $(VENV)/.stamp-deps $(CUDA_VENV)/.stamp-deps
	rm -rf $(ABI_WHEEL_DIR)
	$(PIP) wheel --no-build-isolation --no-deps -w $(ABI_WHEEL_DIR) .
	$(CUDA_PIP) install --no-deps --force-reinstall $(ABI_WHEEL_DIR)/rmask_kernels-*+cpu-cp310-abi3-*.whl
	cd build && $(abspath $(CUDA_PY)) -c "import torch, rmask_kernels as rk; from rmask_kernels import _C; \
	  print('abi-check: wheel built with', '$$($(abspath $(PY)) -c 'import torch; print(torch.__version__)')', \
	  '-> runs with torch', torch.__version__, rk.available_backends(), _C.__file__)"
	RMASK_TEST_INSTALLED=1 RMASK_PARITY_BACKENDS=reference,cpu $(CUDA_VENV)/bin/pytest -q -p no:cacheprovider \
	  tests/test_stable_abi.py tests/test_parity.py tests/test_cpu_kernels.py tests/test_functional.py \
	  tests/test_layers.py tests/test_autocast.py tests/test_schemas.py tests/test_wheel_version.py $(PYTEST_ARGS)

# The Triton kernels compiled for sm_80 and sm_90, int32 and int64 offsets, by each Triton
# release the supported CUDA torch releases pin (3.6 for torch 2.11 ... 3.8 for 2.14; make
# test covers the pinned 3.9): one venv per release in build/, then the kernels whose stack is
# not 0, per release (a report, by hand: each release is a ~250 MB download).
TRITON_COMPAT ?= 3.6.0 3.7.1 3.8.0
triton-compat: $(VENV)/.stamp-build
	@for v in $(TRITON_COMPAT); do \
	  test -x build/triton-$$v/bin/python || { $(PYTHON) -m venv build/triton-$$v && \
	    build/triton-$$v/bin/python -m pip --quiet install "$(TORCH_SPEC)" "triton==$$v" numpy; } || exit 1; \
	  for arch in 80 90; do for offsets in "" --wide; do \
	    out=$$(env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=$(CURDIR) \
	      build/triton-$$v/bin/python tests/triton_compile.py --arch $$arch $$offsets 2>&1) || { echo "$$out"; exit 1; }; \
	    echo "triton $$v sm_$$arch $${offsets:-int32}: $$(echo "$$out" | grep -c ' regs=') kernels, spilling:"; \
	    echo "$$out" | grep ' regs=' | grep -v ' stack=0 ' || echo "  none"; \
	  done; done; done

clean:
	rm -rf build dist *.egg-info rmask_kernels/*.so
