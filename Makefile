# fluxrt. The two commands that work on a fresh machine: `make demo` and `make test`.
#   make engines                         tiny model -> fp16 export -> TensorRT plans in out/engines-fp16
#   make engines MODEL=/models/FLUX.1-dev ENGINE_PRECISION=fp8 FP8_FLAGS="--full-calibration --calibration-backend ort-cuda"
#   make ort-ops                         fluxrt's ONNX Runtime kernels (nvcc), for --attention ort-kernels
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLUXRT := $(VENV)/bin/fluxrt
OUT ?= out
MODEL ?= $(OUT)/tiny-dev
ENGINE_PRECISION ?= fp16
# strongly typed engines take their precision from the graph: fp8 plans are built from an fp16 export
EXPORT_PRECISION := $(if $(filter bf16,$(ENGINE_PRECISION)),bf16,fp16)
BUILD_FLAGS ?=
FP8_FLAGS ?=

.PHONY: venv demo test test-all engines ort-ops clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

$(OUT)/tiny-dev/model_index.json: | venv
	$(FLUXRT) tiny-model $(OUT)/tiny-dev --trained

$(OUT)/onnx-fp32/manifest.json: $(MODEL)/model_index.json | venv
	$(FLUXRT) export $(MODEL) --out $(OUT)/onnx-fp32 --precision fp32

$(OUT)/onnx-$(EXPORT_PRECISION)/manifest.json: $(MODEL)/model_index.json | venv
	$(FLUXRT) export $(MODEL) --out $(OUT)/onnx-$(EXPORT_PRECISION) --precision $(EXPORT_PRECISION)

# From nothing to an image on the built-in tiny model, trained on shapes (ONNX Runtime on the CPU).
DEMO_PROMPT ?= a yellow triangle on a blue background
demo: $(OUT)/onnx-fp32/manifest.json
	$(FLUXRT) generate --onnx $(OUT)/onnx-fp32 --backend ort-cpu --prompt "$(DEMO_PROMPT)" \
		--height 128 --width 128 --steps 12 --seed 0 --out $(OUT)/demo.png

engines: $(OUT)/onnx-$(EXPORT_PRECISION)/manifest.json
	$(FLUXRT) build $(OUT)/onnx-$(EXPORT_PRECISION) --out $(OUT)/engines-$(ENGINE_PRECISION) \
		--precision $(ENGINE_PRECISION) $(BUILD_FLAGS) $(if $(filter fp8,$(ENGINE_PRECISION)),$(FP8_FLAGS))

# fluxrt's ONNX Runtime kernels, for transformers exported with --attention ort-kernels
ort-ops: venv
	$(FLUXRT) ort-ops build

# fluxrt's op library compiles against ONNX Runtime's C API headers, which `fluxrt ort-ops build` gets
# from the system's package client (apt-get download libonnxruntime-dev) when no folder is named and
# none is installed. Debian 12's archive has no such package: there the tests give apt a private
# configuration (APT_CONFIG, lists and cache under .venv/apt) with Debian 13's archive, signed by
# the keyring the system already trusts. Elsewhere the file stays empty and apt uses its own sources.
APT_DIR := $(abspath $(VENV))/apt
DEBIAN_WITH_ORT_HEADERS ?= deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main

$(APT_DIR)/apt.conf: | venv
	@mkdir -p $(APT_DIR)/lists/partial $(APT_DIR)/cache/archives/partial $(APT_DIR)/parts
	@if ! command -v apt-get >/dev/null || apt-cache show libonnxruntime-dev >/dev/null 2>&1; then \
		: > $@; \
	else \
		echo '$(DEBIAN_WITH_ORT_HEADERS)' > $(APT_DIR)/sources.list; \
		printf 'Dir::Etc::SourceList "%s/sources.list";\nDir::Etc::SourceParts "%s/parts";\nDir::State::Lists "%s/lists";\nDir::Cache "%s/cache";\n' \
			$(APT_DIR) $(APT_DIR) $(APT_DIR) $(APT_DIR) > $@.tmp && \
		APT_CONFIG=$@.tmp apt-get -qq update && mv $@.tmp $@; \
	fi

# two workers (CI's two cores), one test file each at a time; the session fixtures are made once (tests/conftest.py)
TEST_WORKERS ?= 2
test: venv $(APT_DIR)/apt.conf
	APT_CONFIG=$(APT_DIR)/apt.conf $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# the default suite and the slow tests (the hash-seed reproducibility exports, external data, bench-synthetic's
# property draws): about 5 minutes more
test-all: venv $(APT_DIR)/apt.conf
	APT_CONFIG=$(APT_DIR)/apt.conf $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow"

clean:
	rm -rf $(OUT)
