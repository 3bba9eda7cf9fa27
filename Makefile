# Every target creates the virtual environment itself (.venv), so each works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup system-deps demo test soak test-docker bench protos lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	@bash .ci/system-deps.sh
	@sh .ci/install-docker.sh

demo: setup system-deps
	$(BIN)/python -m packager.demo

test: setup system-deps
	$(BIN)/python -m pytest -q -m "not soak"

# the long variants: thousands of simulated devices, every TUF attack, the whole console tour
soak: setup system-deps
	$(BIN)/python -m pytest -q -m soak

test-docker: setup system-deps
	$(BIN)/python -m pytest -q -m docker

bench: setup
	$(BIN)/pip install -q --no-deps rapidocr_onnxruntime==1.4.4  # ships a 10.9 MB conv ONNX model
	test -x .venv-mlserver/bin/mlserver || ($(PY) -m venv .venv-mlserver && .venv-mlserver/bin/pip install -q mlserver onnxruntime numpy) || echo 'MLServer did not install: bench/serving reports it'
	$(BIN)/python -m bench

protos: setup
	# -Iedge_agent/grpc=protos makes the generated modules import each other as edge_agent.grpc.*
	$(BIN)/python -m grpc_tools.protoc -Iedge_agent/grpc=protos --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/oip_messages.proto protos/grpc_service.proto

lint: setup
	$(BIN)/ruff check packager edge_agent tests bench
	$(BIN)/mypy packager edge_agent

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
