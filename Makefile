# Every target sets up .venv when it is missing. torch is pinned to the CPU wheel these machines
# carry (an unpinned torch pulls the CUDA build) and triton to the version torch 2.13 expects.
PY      := .venv/bin/python
PINS    := torch==2.13.0 triton==3.7.1
TOOLS   := numpy pytest hypothesis pytest-benchmark ninja scikit-learn
STAMP   := .venv/.installed

.PHONY: demo test bench clean

$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet $(PINS) $(TOOLS)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gacd_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv build *.egg-info
