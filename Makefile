# The README's two commands are `make demo` and `make test`; both create the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diqa-installed
# Tests and the demo never reach a model hub.
OFFLINE := HF_HUB_OFFLINE=1 DIQA_OFFLINE=1

.PHONY: install test test-slow test-compile demo readme-map bench fuzz manifest clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The suite without the tests marked slow (about 5 minutes on 2 cores); test-slow runs the rest.
test: install
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(OFFLINE) $(BIN)/python -m pytest -q -m slow

# torch.compile against eager scores (minutes to most of an hour on 2 CPU cores; not in CI).
test-compile: install
	$(OFFLINE) DIQA_TEST_COMPILE=1 $(BIN)/python -m pytest -q tests/test_speed_levers.py -k compiled

demo: install
	$(OFFLINE) $(BIN)/diqa demo

# The image and video decoder fuzz tests with a longer budget than `make test` gives them
# (seconds for each; FUZZ_SECONDS=N).
FUZZ_SECONDS ?= 300
fuzz: install
	$(OFFLINE) DIQA_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -s tests/test_fuzz_decode.py tests/test_fuzz_video.py -k time_budget

# The README's map image: the overlay `diqa demo` writes for its half-noised photo.
readme-map: install
	rm -rf build/readme-map
	$(OFFLINE) $(BIN)/diqa demo --out build/readme-map > /dev/null
	cp build/readme-map/maps/patched.*.map.png docs/demo-map.png

bench: install
	$(OFFLINE) $(BIN)/python bench/bench.py

# The top-level manifest is the source of truth; the package ships a copy (a test holds them equal).
manifest:
	cp weights_manifest.json diqa_cli/data/weights_manifest.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
