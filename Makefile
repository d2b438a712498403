# Thin wrappers: setup.sh does the work and is fast when nothing changed.
.PHONY: setup demo test clean

setup:
	./setup.sh

demo: setup
	.venv/bin/python demo.py

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=20 tests

# Caches the project generates; keeps .venv (rm -rf .venv to rebuild it) and never touches runs/ or data/,
# where the README puts your runs and label files (the dataset caches there are data/*-train-*.beton and
# data/*-test-*.beton: delete them by hand if you want them rebuilt).
clean:
	rm -rf .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
