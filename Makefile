# make serve: install, train and export the default models if there are none, serve on port 8000.
# make test:  install, run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNS := runs
REPOSITORY := model_repository

.PHONY: install test image-test models serve bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,export,serve,test]"
	touch $@

# two workers (pytest-xdist), each test file on one of them: half the time of one process (docs/testing.md)
test: install
	$(PY) -m pytest -n 2 --dist loadfile --durations=25

# the serving images (GPU and CPU) built and run for real with podman (../shared/tools/container-engine.sh)
image-test: install
	$(PY) -m pytest tests/image -p no:cacheprovider -o addopts="-q" -s

# the quick default models, trained and exported (verified) into the model repository:
# an IMDB GRU classifier and a Time Machine character GRU
models: install $(REPOSITORY)/imdb-gru $(REPOSITORY)/timemachine-gru

$(REPOSITORY)/%: $(RUNS)/%/model.safetensors
	$(PY) -m export $(RUNS)/$* --repository $(REPOSITORY)

$(RUNS)/imdb-gru/model.safetensors:
	$(PY) -m models.train classifier --data imdb --arch gru --epochs 4 --out $(RUNS)/imdb-gru

$(RUNS)/timemachine-gru/model.safetensors:
	$(PY) -m models.train lm --data timemachine --arch gru --out $(RUNS)/timemachine-gru

serve: models
	$(PY) -m serving --repository $(REPOSITORY) --port 8000

# the benchmark harness (docs/benchmarks.md): the IMDB BiLSTM and the Time Machine GRU
bench: install $(REPOSITORY)/imdb-bilstm $(REPOSITORY)/timemachine-gru
	$(PY) -m loadtest bench --model imdb-bilstm --lm timemachine-gru --repository $(REPOSITORY) --runs $(RUNS)

$(RUNS)/imdb-bilstm/model.safetensors:
	$(PY) -m models.train classifier --data imdb --arch bilstm --epochs 3 --out $(RUNS)/imdb-bilstm

clean:
	rm -rf $(VENV) $(RUNS) $(REPOSITORY)
