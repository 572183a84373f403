"""Habits that keep the code easy to change: short functions (issue 14)."""

import ast
from pathlib import Path

import main

REPO = Path(__file__).resolve().parent.parent
MAX_BODY_LINES = 60


def source_files() -> list[Path]:
    """Every Python file of the program (tests and the virtual environment excluded)."""
    return sorted(p for p in REPO.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(REPO).parts))


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, skip_docstring: bool) -> int:
    """Lines from the body's first statement to its last (after the docstring where `skip_docstring`)."""
    body = node.body
    if skip_docstring and ast.get_docstring(node) is not None:
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def long_functions(path: Path, subcommands: set[str]) -> list[str]:
    """`file:line name (N lines)` of each function in `path` whose body is over MAX_BODY_LINES; a subcommand's
    docstring defines its flags' help and does not count."""
    found, shown = [], path.relative_to(REPO) if path.is_relative_to(REPO) else path
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = body_lines(node, skip_docstring=node.name in subcommands)
            if n > MAX_BODY_LINES:
                found.append(f"{shown}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_body_is_over_60_lines():
    subcommands = {fn.__name__ for fn in main.COMMANDS.values()}
    found = [
        hit for path in source_files() for hit in long_functions(path, subcommands if path.name == "main.py" else set())
    ]
    assert not found, found


def test_the_length_check_counts_a_long_body(tmp_path):
    """The check itself: 61 statements are too many, 60 are not; a subcommand's docstring is not counted."""
    def write(name: str, statements: int, docstring_lines: int = 0) -> Path:
        doc = ['    """', *["    help"] * docstring_lines, '    """'] if docstring_lines else []
        path = tmp_path / f"{name}.py"
        path.write_text("\n".join([f"def {name}():", *doc, *["    x = 1"] * statements, ""]))
        return path

    assert long_functions(write("short", 60), set()) == []
    assert len(long_functions(write("long", 61), set())) == 1
    assert long_functions(write("train", 50, docstring_lines=40), {"train"}) == []
    assert len(long_functions(write("helper", 50, docstring_lines=40), set())) == 1
