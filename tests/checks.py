"""python -m tests.checks [FOLDER]: the checks written in a test folder (default tests/), counted
from the source: test functions, `assert` statements and `pytest.raises` blocks, per file and in
all. With `pytest --collect-only -q | tail -1` (the tests as parametrized), what docs/testing.md
compares before and after a change to the suite."""
import ast
import sys
from pathlib import Path


def counts(path: Path) -> tuple[int, int, int]:
    """(test functions, assert statements, pytest.raises calls) in one file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = list(ast.walk(tree))
    tests = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_") for n in nodes)
    asserts = sum(isinstance(n, ast.Assert) for n in nodes)
    raises = sum(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "raises"
                 for n in nodes)
    return tests, asserts, raises


def main(folder: Path = Path("tests")):
    total = [0, 0, 0]
    print(f"{'file':40s} {'tests':>6s} {'asserts':>8s} {'raises':>7s}")
    for path in sorted(folder.rglob("*.py")):
        found = counts(path)
        total = [a + b for a, b in zip(total, found)]
        if any(found):
            print(f"{str(path.relative_to(folder)):40s} {found[0]:6d} {found[1]:8d} {found[2]:7d}")
    print(f"{'all':40s} {total[0]:6d} {total[1]:8d} {total[2]:7d}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests"))
