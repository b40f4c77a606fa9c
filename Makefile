# fluxrt: the two commands that work on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
MODEL ?= $(OUT)/tiny-dev
VARIANT ?= dev
PRECISION ?= fp32
ENGINE_PRECISION ?= fp16

.PHONY: venv demo test engines clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

$(OUT)/tiny-dev/model_index.json: | venv
	$(VENV)/bin/fluxrt tiny-model $(OUT)/tiny-dev --variant dev

$(OUT)/onnx/manifest.json: $(MODEL)/model_index.json
	$(VENV)/bin/fluxrt export $(MODEL) --out $(OUT)/onnx --precision $(PRECISION)

# From nothing to an image on the built-in tiny model.
demo: $(OUT)/onnx/manifest.json
	$(VENV)/bin/fluxrt generate --onnx $(OUT)/onnx --backend ort-cpu --prompt "a lighthouse on a cliff at dawn" \
		--height 256 --width 256 --steps 4 --seed 0 --out $(OUT)/demo.png

engines: $(OUT)/onnx/manifest.json
	$(VENV)/bin/fluxrt build $(OUT)/onnx --out $(OUT)/engines-$(ENGINE_PRECISION) --precision $(ENGINE_PRECISION)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT)
