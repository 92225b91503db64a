#!/usr/bin/env bash
# Install what is missing into .venv, check lint and formatting (ruff), then run the test suite
# (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check --quiet . && ruff format --check --quiet .
python -m pytest -q "$@"
