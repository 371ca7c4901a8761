# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMEDRIVER := /usr/bin/chromedriver

.PHONY: setup demo test bench clean

setup: $(STAMP) $(FASHION)

# torch first (requirements.txt: the pinned build), then gaussdiff with the extras pyproject.toml
# declares for development, then the extras it lists under [tool.gaussdiff] no-deps-extras.
NODEPS := import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); \
  print(" ".join(p for e in d["tool"]["gaussdiff"]["no-deps-extras"] for p in d["project"]["optional-dependencies"][e]))

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/pip install -q --no-deps $$($(BIN)/python -c '$(NODEPS)')
	touch $(STAMP)

# The Fashion-MNIST IDX files come from Debian's dataset-fashion-mnist package.
$(FASHION):
	@if [ ! -f $(FASHION) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	  else echo "install the Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist/"; exit 2; fi; \
	fi

# The playground's browser test drives Debian's Chromium (never a downloaded browser build).
$(CHROMEDRIVER):
	@if [ ! -x $(CHROMEDRIVER) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	  else echo "install chromium and chromedriver under /usr/bin for the browser test"; exit 2; fi; \
	fi

demo: setup
	$(BIN)/python scripts/demo.py

# GAUSSDIFF_REQUIRE_REFERENCES: a missing reference package (Inception weights, guided-diffusion),
# optional extra or the browser
# fails the suite instead of skipping its tests.
test: setup $(CHROMEDRIVER)
	GAUSSDIFF_REQUIRE_REFERENCES=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) demo-out
