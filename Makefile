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

.PHONY: install test demo bench bench-gpu clean cmake-check

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
	$(PY) -m pytest benchmarks/bench_masked_conv2d.py benchmarks/bench_resnet18.py -q -o python_files='bench_*.py' \
	  -p no:cacheprovider --benchmark-json=$(BENCH_JSON) --benchmark-columns=median,iqr --benchmark-sort=name $(BENCH_ARGS)
	$(PY) benchmarks/report.py $(BENCH_JSON) | tee $(BENCH_JSON:.json=.md)

# GPU speed of the triton and cuda backends vs cuDNN F.conv2d * mask (PERF.md's shapes and keep
# ratios, fp32 with TF32 off and bf16, fwd and fwd+bwd): JSON and the markdown ratio table in
# benchmarks/results/. Needs a CUDA device (says so and fails without one).
GPU_BENCH_JSON ?= benchmarks/results/gpu_latest.json
bench-gpu: install
	$(PY) benchmarks/gpu_times.py --json $(GPU_BENCH_JSON) $(BENCH_ARGS)

# Build the C++ library against LibTorch with CMake, as C++ users do (no Python involved).
cmake-check: install
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	cd build/cmake && ctest --output-on-failure

clean:
	rm -rf build dist *.egg-info rmask_kernels/*.so
