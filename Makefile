# Thin wrappers: setup.sh does the work and is fast when nothing changed.
.PHONY: setup demo test clean

setup:
	./setup.sh

demo: setup
	.venv/bin/python demo.py

test: setup
	.venv/bin/python -m pytest -q tests

# Outputs and caches; keeps .venv (rm -rf .venv to rebuild it).
clean:
	rm -rf runs data .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
