# Two commands on a fresh machine: `make demo` and `make test`. Everything lives in .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on the CI machines' disk (an unpinned torch pulls CUDA, GBs).
TORCH_SPEC ?= torch==2.13.0
LINT_PATHS := producer worker devstack tests benchmarks examples

.PHONY: gpu-wheels install browser bench-server test test-unit mutation demo dev lint bench-queue bench-gpu tiny-model schema constraints clean redis-server settings-doc

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e '.[worker,monitor,server,test,lint]'
	touch $(STAMP)

install: $(STAMP) redis-server browser

redis-server:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# Debian's chromium for the browser tests (Flower's pages, the try-it page); playwright drives it,
# its own browser download is never used.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

tiny-model: install
	$(PY) -m sdqueue.cli build-tiny-model .cache/tiny-sd

test: install tiny-model browser
	$(PY) -m pytest -m "not gpu" -q

# The unit layer alone: seconds, no services, no model.
test-unit: install
	$(PY) -m pytest tests/unit -q

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Mutation testing of the core modules against the unit layer (minutes; not in CI). The scratch copy
# .mutation/ puts both packages under src/, where mutmut looks; docs/mutation-report.md explains survivors.
mutation: install
	$(PIP) install -q -c constraints.txt -e '.[mutation]'
	rm -rf .mutation && mkdir -p .mutation/src
	cp -r producer/sdqueue worker/sdqueue_worker .mutation/src/
	cp -r tests benchmarks devstack docs examples pyproject.toml .mutation/
	cd .mutation && env -u PYTHONPATH ../$(VENV)/bin/mutmut run --max-children 2; ../$(VENV)/bin/mutmut results --all true > results.txt; tail -5 results.txt

demo: install tiny-model
	$(PY) -m devstack.demo

# A local stack that stays up until Ctrl-C: Redis, S3 (moto), a tiny-model worker, the notifier,
# Flower (and `sdqueue serve` where it exists); prints the URLs and the export lines.
dev: install tiny-model
	$(PY) -m devstack.dev

schema: install
	$(PY) -m sdqueue.cli schema > docs/job-schema.json

# docs/settings.md from the settings classes (tests/unit/test_settings_reference.py checks it).
settings-doc: install
	$(PY) -m sdqueue_worker.settings_doc > docs/settings.md

constraints: install
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze | grep -v '^-e\|^sdqueue\|^torch=\|^nvidia\|^triton'; } > constraints.new
	mv constraints.new constraints.txt

bench-queue: install tiny-model
	$(PY) -m benchmarks.queue_overhead

# The HTTP front door's submit latency and rate (results land in benchmarks/results/).
bench-server: install
	$(PY) -m benchmarks.server_load

# On a GPU machine: raw parts in benchmarks/results/raw/, merged JSON + table + plot in
# benchmarks/results/ (see benchmarks/gpu_bench.py and docs/performance.md).
bench-gpu: install
	$(PY) -m benchmarks.gpu_bench --only sd15 --only sdxl --only fp8

# Wheels (and a redis-server) for a GPU machine with no network: carry .whl/ there (see the list).
gpu-wheels:
	mkdir -p .whl/redis/bin .whl/redis/lib
	grep -v '^#' benchmarks/gpu-machine-wheels.txt | xargs python3 -m pip download -q --no-deps \
	  --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
	  $(foreach n,17 24 27 28 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
	cp "$$(command -v redis-server)" .whl/redis/bin/
	cp $$(ldd "$$(command -v redis-server)" | grep -o '/[^ ]*\(liblzf\|libjemalloc\)[^ ]*') .whl/redis/lib/

clean:
	rm -rf $(VENV) .cache demo-output
