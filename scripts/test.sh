#!/usr/bin/env bash
# Install what is missing into .venv, then run the test suite (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
