"""The files' layout: imports only go down, model <- run <- data <- train / eval / push <- bench, so
each name lives in the file of its concern (a circle, even through a function-level import, means
one does not), and run.py, the operations module, imports no teaching file."""
import ast
import os

from conftest import ROOT

LAYERS = {"model": 0, "run": 1, "data": 2, "train": 3, "eval": 3, "push": 3, "bench": 4}


def project_imports(path):
    """The project modules a file imports anywhere in it, function-level imports included."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_imports_only_go_down_with_no_circle():
    for module, layer in LAYERS.items():
        for imported in project_imports(os.path.join(ROOT, f"{module}.py")):
            assert LAYERS[imported] < layer, f"{module}.py imports {imported}.py: arrows go model <- run <- data <- " \
                                             "train / eval / push <- bench"
    assert project_imports(os.path.join(ROOT, "run.py")) <= {"model"}


def test_the_demo_script_is_a_leaf_that_no_module_imports():
    """data/demo/prepare.py builds the demo from the modules; they run it as a program, never import it."""
    assert project_imports(os.path.join(ROOT, "data", "demo", "prepare.py")) <= {"model", "run", "data"}
    for module in LAYERS:
        tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "prepare" not in imported, module
