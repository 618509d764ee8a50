"""`vlv seeds` on a fake two-notebook project: a failing seed stops the command, and the same command resumes it at the
notebook that failed (the earlier one is not run again); the report gathers the finished seeds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from vlv.cli import main

WRITE = """import json; from pathlib import Path
seed = int(cfg_overrides.split('run.seed=')[1])
Path(run_dir, 'first.json').write_text(json.dumps(seed))"""
CHECK = """import json; from pathlib import Path
assert not Path(flag).exists(), 'asked to fail'
seed = json.loads(Path(run_dir, 'first.json').read_text())
Path(run_dir, 'metrics.json').write_text(json.dumps({'summary': {'t': {'row': {'x': float(seed), 'n': 3}}}}))"""


def notebook(path: Path, parameters: str, body: str) -> None:
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'settings.ini').write_text('[DEFAULT]\nlib_name = fake\nnbs_path = nbs\n')
    common = "preset = 'smoke'\nrun_dir = None\ncfg_overrides = ''"
    notebook(tmp_path / 'nbs' / '01_write.ipynb', common, WRITE)
    notebook(tmp_path / 'nbs' / '02_check.ipynb', f"{common}\nflag = {str(tmp_path / 'fail')!r}", CHECK)
    return tmp_path


def test_a_failed_seed_resumes_where_it_stopped(project, capsys):
    args = ['seeds', '--preset', 'smoke', '--seeds', '0', '1', '--nbs', str(project / 'nbs'), '--name', 's', '--no-progress']
    (project / 'fail').touch()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert '02_check.ipynb' in err and 'run the same command again' in err
    seed0 = project / 'runs' / 's' / 'seed-0'
    first = (seed0 / '01_write.ipynb').stat().st_mtime_ns
    assert not (project / 'runs' / 's' / 'seed-1').exists()           # the command stopped at the failing seed
    (project / 'fail').unlink()
    assert main(args) == 0
    assert 'resuming at 02_check.ipynb' in capsys.readouterr().out
    assert (seed0 / '01_write.ipynb').stat().st_mtime_ns == first     # not run again
    metrics = json.loads((project / 'runs' / 's' / 'metrics.json').read_text())
    assert metrics['seeds'] == [0, 1]
    assert metrics['summary']['t (mean ± std over 2 seeds)']['row'] == {'x': '0.500 ± 0.707', 'n': '3.000 ± 0.000'}
    assert metrics['stats']['t']['row']['x']['values'] == {'0': 0.0, '1': 1.0}


def test_bad_requests_fail_before_anything_runs(project, capsys):
    base = ['seeds', '--preset', 'smoke', '--nbs', str(project / 'nbs'), '--no-progress']
    assert main([*base, '--seeds', '1', '1']) == 2
    assert 'distinct' in capsys.readouterr().err
    assert main([*base, '--seeds', '0', '-o', 'run.seed=4']) == 2
    assert '--seeds' in capsys.readouterr().err
    assert not (project / 'runs').exists()


def test_the_report_gathers_a_seed_whose_notebook_is_running_again(tmp_path):
    "A seed re-running one notebook (its manifest not ok) keeps its numbers in the report; its time reads 'unfinished'."
    from vlv.seeds import write_seeds_report
    for seed, status in ((0, 'ok'), (1, 'running')):
        run = tmp_path / f'seed-{seed}'; run.mkdir()
        (run / 'metrics.json').write_text(json.dumps({'summary': {'t': {'row': {'x': float(seed)}}}}))
        notebooks = {'01.ipynb': dict(status='ok', seconds=60.0), '02.ipynb': dict(status=status, seconds=120.0)}
        (run / 'manifest.json').write_text(json.dumps(dict(notebooks=notebooks, history=[{}] * seed)))
    write_seeds_report(tmp_path, [0, 1])
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['summary']['t (mean ± std over 2 seeds)']['row'] == {'x': '0.500 ± 0.707'}
    assert metrics['minutes'] == {'0': 3.0, '1': None}
    times = metrics['summary']["time of each seed's run (sum of its notebooks)"]
    assert times == {'seed 0': {'minutes': 3.0, 'vlv run calls': 1}, 'seed 1': {'minutes': 'unfinished', 'vlv run calls': 2}}
    assert '1: unfinished (a notebook is not ok) (2 `vlv run` calls)' in (tmp_path / 'report.md').read_text()
