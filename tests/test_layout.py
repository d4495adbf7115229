"""The layout the map (docs/architecture.md) describes stays true: orchestrator's modules import
each other without cycles, every module is on the map, no function outgrows a screen."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / 'orchestrator').glob('*.py'))
LONGEST = 80  # lines: a function a reader sees whole


def _imports(path):
    """The orchestrator modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == 'orchestrator':
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('orchestrator.'):
            found.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names
                      if a.name.startswith('orchestrator.')}
    return found - {path.stem}


def test_orchestrator_modules_import_each_other_without_cycles():
    graph = {p.stem: _imports(p) for p in MODULES}
    done, cycles = set(), []

    def visit(module, path):
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles


def test_every_module_is_on_the_map():
    text = (ROOT / 'docs' / 'architecture.md').read_text()
    missing = [p.name for p in MODULES if p.stem != '__init__' and p.name not in text]
    assert not missing, missing


def test_no_orchestrator_function_is_longer_than_a_screen():
    long = [f'{p.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
            for p in MODULES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST]
    assert not long, long
