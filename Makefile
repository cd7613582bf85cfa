VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(BIN)/visionbench run unip-infrared

test: setup
	$(BIN)/python -m pytest -q -n auto

lint: setup
	$(BIN)/ruff check visionbench tests benchmarks

bench: setup
	$(BIN)/python benchmarks/mae_step.py
	$(BIN)/python benchmarks/probe_sweep.py
	$(BIN)/python benchmarks/norm_inference.py
	$(BIN)/python benchmarks/videomae_step.py
	$(BIN)/python benchmarks/video_decode.py
	$(BIN)/python benchmarks/bootstrap_map.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
