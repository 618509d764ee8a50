"Packaging and project-layout checks: settings, notebooks' parameters cells, the console script, imports."
import ast
import configparser
import importlib
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = re.compile(r'^(\d\d)([a-z]?)_.*\.ipynb$')


def settings():
    parser = configparser.ConfigParser(delimiters=['='])
    parser.read(ROOT / 'settings.ini')
    return parser['DEFAULT']


def pipeline_notebooks():
    return sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if (m := PIPELINE.match(p.name)) and int(m[1]) < 90)


def test_settings_keep_tags_and_flags():
    s = settings()
    assert s['allowed_cell_metadata_keys'].split() == ['tags']
    assert {'slow', 'cuda'} <= set(s['tst_flags'].split())
    assert 'vlv=vlv.cli:main' in s['console_scripts']
    nbdev_pin = [r for r in s['dev_requirements'].split() if r.startswith('nbdev')]
    assert nbdev_pin and '<3' in nbdev_pin[0]


@pytest.mark.parametrize('notebook', pipeline_notebooks(), ids=lambda p: p.name)
def test_pipeline_notebook_has_smoke_parameters_cell(notebook):
    cells = json.loads(notebook.read_text())['cells']
    tagged = [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(tagged) == 1, f"{notebook.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    source = ''.join(tagged[0]['source'])
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name): values[node.target.id] = node.value
        elif isinstance(node, ast.Assign): values.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
    assert ast.literal_eval(values['preset']) == 'smoke', f"{notebook.name}: parameters default must be the smoke preset"
    assert ast.literal_eval(values['run_dir']) is None


def test_every_exported_notebook_has_its_module():
    for notebook in (ROOT / 'nbs').glob('*.ipynb'):
        text = notebook.read_text()
        if m := re.search(r'#\|\s*default_exp\s+([\w.]+)', text):
            module = ROOT / 'vlv' / (m[1].replace('.', '/') + '.py')
            assert module.exists(), f"{notebook.name} exports to {module.name}, which is missing: run nbdev_export"


def test_all_modules_import():
    for module in sorted((ROOT / 'vlv').glob('*.py')):
        importlib.import_module(f'vlv.{module.stem}' if module.stem != '__init__' else 'vlv')


def test_console_script_is_installed():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group='console_scripts')}
    assert scripts.get('vlv') == 'vlv.cli:main'


@pytest.mark.slow
def test_import_does_not_touch_the_network(run_process):
    code = ("import socket\n"
            "def refuse(*a, **k): raise RuntimeError('network access at import time')\n"
            "socket.socket.connect = refuse\n"
            "import vlv, pkgutil, importlib\n"
            "for m in pkgutil.iter_modules(vlv.__path__): importlib.import_module('vlv.' + m.name)\n")
    proc = run_process([sys.executable, '-c', code], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
