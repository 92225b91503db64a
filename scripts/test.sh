#!/usr/bin/env bash
# Install what is missing into .venv, check lint and formatting (ruff), then run the test suite
# (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check --quiet . || exit 1  # not `a && b`: errexit skips a failure before the last command of a list
ruff format --check --quiet . || exit 1
python -m pytest -q "$@"
