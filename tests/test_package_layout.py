"""The package's shape, as the layout rules state it: a leaf helper package, at most two loose
modules, no import cycle, small functions, help text for every flag of every tool."""

import argparse
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dit_moe"
MAX_LINES, MAX_PARAMS = 60, 8
# DiT's public diffusion API, restated with its exact signatures so DiT users' calls keep working.
DIT_SIGNATURES = {
    ("diffusion/gaussian.py", "create_diffusion"),
    ("diffusion/gaussian.py", "p_sample_loop"),
    ("diffusion/gaussian.py", "ddim_sample_loop"),
}


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """dit_moe modules `name` imports at module level (a submodule when the imported name is one)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as a list of modules, or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycle_and_utils_is_a_leaf():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycle(graph) == []
    leaf = {name: sorted(m for m in deps if not m.startswith("dit_moe.utils")) for name, deps in graph.items()}
    assert {name: deps for name, deps in leaf.items() if name.startswith("dit_moe.utils") and deps} == {}


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_at_most_two_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 2, loose


def _oversized(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if (str(path.relative_to(PACKAGE)), node.name) in DIT_SIGNATURES:
            continue
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        count = sum(p is not None and p.arg not in ("self", "cls") for p in params)
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES or count > MAX_PARAMS:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines, {count} parameters)")
    return found


def test_no_function_over_60_lines_or_8_parameters():
    assert [item for path in sorted(PACKAGE.rglob("*.py")) for item in _oversized(path)] == []


def test_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = PACKAGE / "_probe_for_layout_test.py"
    source.write_text(f"def long(a, b, c, d, e, f, g, h, i):\n{body}\n")
    try:
        assert _oversized(source) == ["_probe_for_layout_test.py:1 long (61 lines, 9 parameters)"]
    finally:
        source.unlink()


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from dit_moe.data.extract import build_parser as extract
    from dit_moe.evaluation.__main__ import build_parser as evaluation
    from dit_moe.models.__main__ import build_parser as models
    from dit_moe.routing.cli import DESCRIPTIONS
    from dit_moe.routing.cli import build_parser as routing
    from dit_moe.sampling.grid import build_parser as grid
    from dit_moe.sampling.many import build_parser as many
    from dit_moe.train.config import build_parser as train
    from dit_moe.upcycle.tool import build_parser as upcycle

    parsers = {"train": train(), "sample.py": grid(), "many": many(), "upcycle": upcycle()}
    parsers.update({"evaluation": evaluation(), "extract": extract(), "models": models()})
    parsers.update({f"routing {command}": routing(command) for command in DESCRIPTIONS})
    return parsers


def _undocumented(name: str, parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                missing += _undocumented(f"{name} {sub}", subparser)
            continue
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = (action.help or "").strip()
        if not text or text.startswith(("(default", "[choices")):
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        elif action.choices and not isinstance(action.choices, dict) and action.metavar:
            listed = all(str(choice) in text for choice in action.choices) or "python -m dit_moe.models" in text
            if not listed:
                missing.append(f"{name} {action.option_strings[0]} (choices not listed)")
    return missing


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_flag_has_help_and_lists_its_choices(name):
    assert _undocumented(name, _parsers()[name]) == []


def test_presets_can_be_listed(capsys):
    from dit_moe.models.__main__ import main, parameter_count

    assert main([]) == 0
    listed = capsys.readouterr().out
    assert "DiT-XL/2" in listed and "DiT-G/2" in listed and "DiT-T/2" in listed
    # DiT's paper: DiT-XL/2 has 675M parameters.
    assert round(parameter_count("DiT-XL/2", num_experts=0) / 1e6) == 675


def test_trainer_help_lists_the_choices_of_fixed_set_flags():
    from dit_moe.train.flags import FIELD_CHOICES, build_parser

    helps = {a.dest.split(".")[-1]: a.help for a in build_parser()._actions}
    for name, choices in FIELD_CHOICES.items():
        assert all(choice in helps[name] for choice in choices), name
