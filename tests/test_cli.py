"""Tests of the `vlv` command (vlv.cli) on a tiny fake project built in a temporary folder.

Only four notebook executions in all (about a second each): one shared successful run, a failing resume
run through `python -m vlv.cli`, and an interrupted one; everything else is checked before any kernel starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

import vlv
from vlv.cli import COMMANDS, Command, RunError, main, pipeline_notebooks, plan_run


def make_notebook(path: Path, parameters: str, body: str, kernelspec: bool = True) -> None:
    "A two-cell notebook: a cell tagged `parameters` and a body; without metadata (as nbdev_clean leaves it) if not `kernelspec`."
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}} if kernelspec else {})
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


RECORD_BODY = """\
import json, os, sys
from pathlib import Path
Path(run_dir, 'record.json').write_text(json.dumps(dict(preset=preset, run_dir=run_dir, extra=extra, python=sys.executable,
    pythonpath=os.environ.get('PYTHONPATH', ''), cwd=os.getcwd())))
"""
CHECK_BODY = """\
import json, os, time
from pathlib import Path
Path(run_dir, 'kernel.pid').write_text(str(os.getpid()))
time.sleep(wait)
assert not fail, 'asked to fail'
Path(run_dir, 'check.json').write_text(json.dumps(json.loads(Path(run_dir, 'record.json').read_text())['extra'] + 1))
"""


def make_project(root: Path) -> Path:
    "settings.ini, .gitignore and nbs/ with two pipeline notebooks plus two that must never run; committed to git."
    (root / 'nbs').mkdir(parents=True)
    (root / 'settings.ini').write_text('[DEFAULT]\nlib_name = fake\nnbs_path = nbs\n')
    (root / '.gitignore').write_text('runs/\n')
    make_notebook(root / 'nbs/01_record.ipynb', "preset: str = 'smoke'\nrun_dir: str | None = None\nextra: int = 1  # only here", RECORD_BODY)
    make_notebook(root / 'nbs/02_check.ipynb', "preset = 'smoke'\nrun_dir: str | None = None\nfail = False\nwait = 0.0", CHECK_BODY, kernelspec=False)
    make_notebook(root / 'nbs/95_tool.ipynb', "preset = 'smoke'\nrun_dir = None", "raise RuntimeError('tooling must not run')")
    make_notebook(root / 'nbs/index.ipynb', "preset = 'smoke'\nrun_dir = None", "raise RuntimeError('index must not run')")
    git = ['git', '-C', str(root), '-c', 'user.name=test', '-c', 'user.email=test@example.org', '-c', 'commit.gpgsign=false']
    subprocess.run([*git, 'init', '-q'], check=True)
    subprocess.run([*git, 'add', '.'], check=True)
    subprocess.run([*git, 'commit', '-q', '-m', 'fake project'], check=True)
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp('fake') / 'project')


@pytest.fixture(scope='module')
def first_run(project):
    "One real run shared by several tests: `vlv run --preset toy --name r1 -p extra 5` from inside the project."
    before, cwd = snapshot(project / 'nbs'), os.getcwd()
    os.chdir(project / 'nbs')  # the project is found by searching upward from the cwd
    try:
        t0 = time.perf_counter()
        rc = main(['run', '--preset', 'toy', '--name', 'r1', '-p', 'extra', '5', '--no-progress'])
        seconds = time.perf_counter() - t0
    finally: os.chdir(cwd)
    return dict(rc=rc, run_dir=project / 'runs' / 'r1', nbs_before=before, seconds=seconds)


# --- checks that run nothing -------------------------------------------------------------------------------

def test_pipeline_order_and_skipping(tmp_path):
    for name in ['10_late.ipynb', '03b_more.ipynb', '03_x.ipynb', '03a_teacher.ipynb', '00_core.ipynb', '89_last.ipynb',
                 '90_cli.ipynb', '99_bench.ipynb', 'index.ipynb', 'Untitled.ipynb', '3_short.ipynb', '03A_upper.ipynb',
                 '04_notes.md']:
        (tmp_path / name).touch()
    assert [p.name for p in pipeline_notebooks(tmp_path)] == [
        '00_core.ipynb', '03_x.ipynb', '03a_teacher.ipynb', '03b_more.ipynb', '10_late.ipynb', '89_last.ipynb']


def test_dry_run_plan(project, capsys):
    args = ['run', '--preset', 'toy', '--name', 'dry', '-p', 'extra', '7', '-y', '{fail: false}', '--nbs', str(project / 'nbs'), '--dry-run']
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert lines[1].startswith('01_record.ipynb:') and 'extra=7' in lines[1] and 'fail' not in lines[1]
    assert lines[2].startswith('02_check.ipynb:') and 'fail=False' in lines[2] and 'extra' not in lines[2]
    assert '95_tool' not in out and 'index' not in out and len(lines) == 3
    assert f"run_dir='{project / 'runs' / 'dry'}'" in lines[1]
    assert not (project / 'runs' / 'dry').exists()


def test_unknown_parameter_is_an_error(project, capsys):
    assert main(['run', '--preset', 'toy', '--name', 'bad', '-p', 'extar', '5', '--nbs', str(project / 'nbs')]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'extar'" in err and 'known parameters: extra, fail, wait' in err
    assert not (project / 'runs' / 'bad').exists()
    with pytest.raises(RunError, match='--preset'): plan_run('toy', 'bad', {'preset': 'paper'}, nbs=project / 'nbs')


def test_resume_refused_without_successful_records(project, tmp_path, capsys):
    nbs = ['--nbs', str(project / 'nbs'), '--runs-dir', str(tmp_path)]
    assert main(['run', '--preset', 'toy', '--name', 'none', '--from', '02', *nbs]) == 2
    assert 'manifest.json does not exist' in capsys.readouterr().err
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / 'manifest.json').write_text(json.dumps({'preset': 'toy', 'notebooks': {'01_record.ipynb': {'status': 'failed'}}}))
    assert main(['run', '--preset', 'toy', '--name', 'half', '--from', '02_check', *nbs]) == 2
    assert '01_record.ipynb (failed)' in capsys.readouterr().err
    assert main(['run', '--preset', 'toy', '--name', 'half', '--from', '07', *nbs]) == 2
    assert 'no such pipeline notebook' in capsys.readouterr().err
    assert main(['run', '--preset', 'toy', '--name', 'half', '--from', '02', '--force', '--dry-run', *nbs]) == 0


def test_only_runs_the_named_notebooks(project, tmp_path, capsys):
    nbs = ['--nbs', str(project / 'nbs'), '--runs-dir', str(tmp_path)]
    assert main(['run', '--preset', 'toy', '--name', 'one', '--only', '02', '--dry-run', *nbs]) == 0
    out = capsys.readouterr().out
    assert '02_check.ipynb:' in out and '01_record.ipynb:' not in out and 'not running: 01_record.ipynb' in out
    assert main(['run', '--preset', 'toy', '--name', 'one', '--only', '02', '--from', '01', *nbs]) == 2
    assert 'exclude each other' in capsys.readouterr().err
    assert main(['run', '--preset', 'toy', '--name', 'one', '--only', '09', *nbs]) == 2
    assert "'09': no such pipeline notebook" in capsys.readouterr().err


def test_to_stops_after_the_named_notebook(project, tmp_path, capsys):
    nbs = ['--nbs', str(project / 'nbs'), '--runs-dir', str(tmp_path)]
    assert main(['run', '--preset', 'toy', '--name', 'head', '--to', '01', '--dry-run', *nbs]) == 0
    out = capsys.readouterr().out
    assert '01_record.ipynb:' in out and '02_check.ipynb:' not in out
    assert main(['run', '--preset', 'toy', '--name', 'head', '--to', '01', '--only', '01', *nbs]) == 2
    assert 'exclude each other' in capsys.readouterr().err
    assert main(['run', '--preset', 'toy', '--name', 'head', '--from', '02', '--to', '01', '--force', *nbs]) == 2
    assert 'comes before --from' in capsys.readouterr().err


def test_help_texts(monkeypatch, capsys):
    "`vlv --help` lists every command of the table and imports none of them; `vlv run --help` shows the options and examples."
    monkeypatch.setattr(Command, 'load', lambda self, part: pytest.fail(f"`vlv --help` loaded {getattr(self, part)}"))
    with pytest.raises(SystemExit) as e: main(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(name in out for name in COMMANDS)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e: main(['run', '--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(s in out for s in ['--from', '--preset', '-p KEY VALUE', 'examples:', 'manifest.json'])


def test_every_command_of_the_table_resolves():
    "Each row names a function that declares the options, a handler, and (if any) an epilog, all importable."
    for name, cmd in COMMANDS.items():
        assert callable(cmd.load('arguments')) and callable(cmd.load('handler')), name
        if cmd.epilog: assert isinstance(cmd.load('epilog'), str), name


def test_adding_a_subcommand(monkeypatch, capsys):
    "A command is one row of the static table: its parts are named 'module:function' and imported when it runs."
    hello = types.ModuleType('hello_command')   # API: rows of vlv.cli.COMMANDS name 'module:function' (no registration)
    hello.add_arguments = lambda p: p.add_argument('--who', default='world')
    def handler(args): print(f'hello {args.who}'); return 7
    hello.handler = handler
    monkeypatch.setitem(sys.modules, 'hello_command', hello)
    monkeypatch.setitem(COMMANDS, 'hello', Command('say hello', 'hello_command:add_arguments', 'hello_command:handler'))
    assert main(['hello', '--who', 'vlv']) == 7
    assert capsys.readouterr().out == 'hello vlv\n'


# --- real runs (the notebooks run in Jupyter kernels: other processes) -------------------------------------

@pytest.mark.slow
def test_run_outputs_and_parameters(first_run, project):
    run_dir = first_run['run_dir']
    assert first_run['rc'] == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ['01_record.ipynb', '02_check.ipynb', 'check.json', 'kernel.pid', 'manifest.json', 'record.json']
    assert snapshot(project / 'nbs') == first_run['nbs_before']  # never executed in place
    record = json.loads((run_dir / 'record.json').read_text())
    assert record['preset'] == 'toy' and record['run_dir'] == str(run_dir) and record['extra'] == 5
    assert record['python'] == sys.executable                     # the kernel is this interpreter
    assert record['pythonpath'].split(os.pathsep)[0] == str(project)  # ... and can import the project
    assert record['cwd'] == str(project / 'nbs')
    assert json.loads((run_dir / 'check.json').read_text()) == 6
    injected = [c for c in nbformat.read(run_dir / '02_check.ipynb', 4).cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert len(injected) == 1 and 'extra' not in injected[0].source and "preset = \"toy\"" in injected[0].source


@pytest.mark.slow
def test_manifest_fields(first_run, project):
    m = json.loads((first_run['run_dir'] / 'manifest.json').read_text())
    head = subprocess.run(['git', '-C', str(project), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert m['git'] == {'commit': head, 'dirty': False}
    assert (m['name'], m['preset'], m['parameters'], m['status'], m['from']) == ('r1', 'toy', {'extra': 5}, 'ok', None)
    assert set(m['versions']) >= {'python', 'vlv', 'torch', 'transformers', 'diffusers', 'accelerate', 'numpy'}
    assert m['versions']['vlv'] == vlv.__version__
    assert m['host']['hostname'] and m['host']['python'] == sys.executable and 'cuda_available' in m['host']['device']
    assert m['started'] <= m['finished'] and 0 < m['seconds'] < first_run['seconds'] + 1
    assert list(m['notebooks']) == ['01_record.ipynb', '02_check.ipynb']
    for name, r in m['notebooks'].items():
        assert r['status'] == 'ok' and r['seconds'] > 0 and r['output'] == name and r['started'] <= r['finished']
    assert m['notebooks']['01_record.ipynb']['parameters'] == {'preset': 'toy', 'run_dir': str(first_run['run_dir']), 'extra': 5}
    assert m['argv'][:2] == ['vlv', 'run'] and m['history'] == []


@pytest.mark.slow
def test_failing_resume_via_subprocess(first_run, project, subprocess_env):
    "`python -m vlv.cli run --from 02 -p fail True`: exit 1, names notebook, cell and copy; keeps 01's record."
    shutil.copytree(first_run['run_dir'], project / 'runs' / 'r2')
    before = json.loads((project / 'runs' / 'r2' / 'manifest.json').read_text())
    out = subprocess.run([sys.executable, '-m', 'vlv.cli', 'run', '--preset', 'toy', '--name', 'r2', '--from', '02',
                          '-p', 'fail', 'True', '--no-progress'], cwd=project, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert 'Passed unknown parameter' not in out.stderr  # papermill's regex misses `run_dir: str | None`; we silence it
    assert ('notebook 02_check.ipynb failed (cell 3: AssertionError: asked to fail); '
            f"open {Path('runs', 'r2', '02_check.ipynb')}") in out.stderr
    m = json.loads((project / 'runs' / 'r2' / 'manifest.json').read_text())
    assert m['status'] == 'failed' and m['from'] == '02_check.ipynb' and m['name'] == 'r2'
    assert m['notebooks']['01_record.ipynb'] == before['notebooks']['01_record.ipynb']   # earlier record kept as it was
    assert m['notebooks']['02_check.ipynb']['status'] == 'failed'
    assert m['notebooks']['02_check.ipynb']['error'] == 'cell 3: AssertionError: asked to fail'
    assert m['parameters'] == {'fail': True} and m['history'][0]['started'] == before['started']
    assert (project / 'runs' / 'r2' / '02_check.ipynb').exists()


@pytest.mark.slow
def test_ctrl_c_records_interrupted(first_run, project, subprocess_env):
    "SIGINT while a notebook runs: exit 130, manifest says 'interrupted', no kernel left behind."
    shutil.copytree(first_run['run_dir'], project / 'runs' / 'r3')
    manifest, pid_file = project / 'runs' / 'r3' / 'manifest.json', project / 'runs' / 'r3' / 'kernel.pid'
    pid_file.unlink()
    proc = subprocess.Popen([sys.executable, '-m', 'vlv.cli', 'run', '--preset', 'toy', '--name', 'r3', '--from', '02',
                             '-p', 'wait', '60', '--no-progress'], cwd=project, env=subprocess_env(), stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell may ignore SIGINT
    try:
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline: time.sleep(0.1)  # the notebook is in its 60 s sleep
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 130, err
    assert 'interrupted while running 02_check.ipynb' in err
    m = json.loads(manifest.read_text())
    assert m['status'] == 'interrupted' and m['notebooks']['02_check.ipynb']['status'] == 'interrupted'
    assert m['notebooks']['01_record.ipynb']['status'] == 'ok'
    kernel_pid, deadline = int(pid_file.read_text()), time.time() + 10
    while time.time() < deadline:
        try: os.kill(kernel_pid, 0)
        except ProcessLookupError: break
        time.sleep(0.1)
    else: pytest.fail(f'kernel process {kernel_pid} still running after the interrupt')


@pytest.mark.slow
def test_publish_outputs(first_run, project, tmp_path):
    executed = first_run['run_dir'] / '01_record.ipynb'
    nbs = tmp_path / 'nbs'; shutil.copytree(project / 'nbs', nbs)
    assert main(['publish', str(executed), '--nbs', str(nbs)]) == 0
    published = nbformat.read(nbs / '01_record.ipynb', 4)
    assert not any('injected-parameters' in c.metadata.get('tags', []) for c in published.cells)
    assert len(published.cells) == len(nbformat.read(project / 'nbs' / '01_record.ipynb', 4).cells)
    changed = nbformat.read(nbs / '02_check.ipynb', 4); changed.cells[1].source += '\n# edited'
    nbformat.write(changed, nbs / '02_check.ipynb')
    assert main(['publish', str(executed.parent / '02_check.ipynb'), '--nbs', str(nbs)]) == 2
