"""The layout the map (docs/architecture.md) describes stays true: orchestrator's modules import
each other without cycles, every module is on the map, no function outgrows a screen, the trials
are enumerated in one place once per sweep start, and the files processes exchange are named
only by their records."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / 'orchestrator').glob('*.py'))
LONGEST = 60  # lines: a function a reader sees whole


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


def _calls(tree, name):
    """The functions (by name) in ``tree`` that call ``name``, one entry per call."""
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [func.name for node in ast.walk(func) if isinstance(node, ast.Call)
                      and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == name]
    return found


def test_the_trials_are_enumerated_once_per_sweep_start():
    """One definition of the trial enumeration (sweep_plan.py), called by make_plan alone; the
    driver makes the plan once on each of its two starts (dry run, sweep); nothing asks Tune's
    generator for its order."""
    trees = {p.name: ast.parse(p.read_text()) for p in MODULES}
    defined = [(name, node.name) for name, tree in trees.items() for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name == '_enumerate_trials']
    assert defined == [('sweep_plan.py', '_enumerate_trials')]
    enumerating = {name: _calls(tree, '_enumerate_trials') for name, tree in trees.items()}
    assert {k: v for k, v in enumerating.items() if v} == {'sweep_plan.py': ['make_plan']}
    planning = {name: _calls(tree, 'make_plan') for name, tree in trees.items()}
    assert {k: v for k, v in planning.items() if v} == {
        'driver.py': ['_print_dry_run', '_prepare_sweep_dir']}
    assert not [p.name for p in MODULES if 'generate_variants' in p.read_text()]


def test_files_between_processes_are_named_by_their_records_only():
    """plan.json, tracking.json, trial.json, placement.json, restarts.jsonl, group.json: each
    name is a string in records.py alone (every reader and writer goes through its record); a
    trial's few-shot list is named by the config builder alone."""
    owner = {name: 'records.py' for name in ('plan.json', 'tracking.json', 'trial.json',
                                             'placement.json', 'restarts.jsonl', 'group.json')}
    owner['fewshot_subset.txt'] = 'trial_config.py'
    found = [f'{p.name}:{node.lineno} {node.value}' for p in MODULES
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Constant) and node.value in owner
             and owner[node.value] != p.name]
    assert not found, found
