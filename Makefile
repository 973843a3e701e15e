# make serve: install, train the default models if there are none, then serve (see README).
# make test:  install, run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNS := runs

.PHONY: install test models serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,test]"
	touch $@

test: install
	$(PY) -m pytest

# the quick default models: an IMDB GRU classifier and a Time Machine character GRU
models: install $(RUNS)/imdb-gru/model.safetensors $(RUNS)/timemachine-gru/model.safetensors

$(RUNS)/imdb-gru/model.safetensors:
	$(PY) -m models.train classifier --data imdb --arch gru --epochs 4 --out $(RUNS)/imdb-gru

$(RUNS)/timemachine-gru/model.safetensors:
	$(PY) -m models.train lm --data timemachine --arch gru --out $(RUNS)/timemachine-gru

# serving arrives with the export and serving issues; until then `make serve` trains the defaults
serve: models
	@echo "trained: $(RUNS)/imdb-gru $(RUNS)/timemachine-gru"

clean:
	rm -rf $(VENV) $(RUNS)
