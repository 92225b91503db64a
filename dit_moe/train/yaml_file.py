"""The experiment YAML: sections `model`, `data`, `objective`, `run`, each value checked against its
field's type, every mistake one sentence naming the file, section and key."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .sections import SECTIONS


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) is list:
        return "a list of integers such as [1, 3]"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _yaml_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint` wants (ints are numbers too; YAML 1.1 reads 1e-3 as a
    string, so numeric strings count as numbers); a wrong type raises one sentence naming `where`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return None if value is None else _yaml_value(value, args[0], where)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    fits = {
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    if typing.get_origin(hint) is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = fits.get(hint, lambda v: True)(value)
    if not ok:
        raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r}; fix the value in the file.")
    return float(value) if hint is float else value


def _read_yaml(path: str) -> dict[str, Any]:
    """The experiment file's mapping; a missing file or a syntax error is one sentence with its line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--config {path} does not exist; pass an experiment YAML such as config/quickstart.yaml."
        )
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"{path}: YAML syntax error{line} ({problem}); fix the file.") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path}: expected sections {sorted(SECTIONS)} at the top level, got {type(raw).__name__}.")
    return raw or {}


def read_sections(path: str) -> dict[str, dict[str, Any]]:
    """Each section's values from the experiment file, keys and types checked against its dataclass."""
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; use {sorted(SECTIONS)}.")
    sections = {}
    for name, section_values in raw.items():
        section_values = section_values or {}
        if not isinstance(section_values, dict):
            raise ValueError(f"{path} [{name}]: expected key: value lines, got {section_values!r}.")
        hints = typing.get_type_hints(SECTIONS[name])
        unknown = sorted(set(section_values) - set(hints))
        if unknown:
            raise ValueError(f"{path} [{name}]: unknown keys {unknown}; valid keys are {sorted(hints)}.")
        sections[name] = {
            key: _yaml_value(value, hints[key], f"{path} [{name}] {key}") for key, value in section_values.items()
        }
    return sections
