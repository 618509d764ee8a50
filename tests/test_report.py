"""Tests of vlv.report: a run's report.md and metrics.json, and `vlv readme` copying the results into README.md."""
import json

from PIL import Image

import vlv.report as R
from vlv.cli import main
from vlv.core import save_json


def test_write_report_and_readme(tmp_path):
    run = tmp_path / 'runs' / 'toy'; run.mkdir(parents=True)
    save_json({'name': 'toy', 'preset': 'toy', 'status': 'ok', 'started': 's', 'finished': 'f', 'seconds': 61.0,
               'git': {'commit': 'abcdef0123456789', 'dirty': False}, 'versions': {'torch': '2.13.0'},
               'notebooks': {'01_data.ipynb': {'status': 'ok', 'seconds': 1.5}, '06_eval.ipynb': {'status': 'ok', 'seconds': 59.5}}},
              run / 'manifest.json')
    save_json({'attribute': 0.97}, run / 'stage1_metrics.json')
    Image.new('RGB', (8, 8), 'red').save(tmp_path / 'outside.png')
    metrics = {'summary': {'ground truth': {'attribute': 0.99, 'exact': 0.96}, 'VLV': {'attribute': 0.91, 'exact': 0.7}},
               **R.gather_metrics(run), 'deep': {'a': {'b': {'c': 1.5}}}}
    report = R.write_report(run, metrics, {'Outside figure': tmp_path / 'outside.png', 'PIL': Image.new('RGB', (4, 4))})
    text = report.read_text()
    assert '| 01_data.ipynb | ok | 1.5 |' in text and '| 06_eval.ipynb | ok | 59.5 |' in text and 'commit abcdef0123' in text
    assert '| ground truth | 0.99 | 0.96 |' in text and '#### a' in text and '| b | 1.5 |' in text
    assert '![Outside figure](figures/outside.png)' in text and (run / 'figures' / 'outside.png').is_file()
    assert json.loads((run / 'metrics.json').read_text())['stage1'] == {'attribute': 0.97}
    assert not list(run.glob('.*.tmp'))                                   # atomic writes leave no temporaries

    readme = tmp_path / 'README.md'
    readme.write_text(f'# vlv\n\n## Results on the toy world\n\n{R.RESULTS_START}\nnothing yet\n{R.RESULTS_END}\n\n## Next\n')
    assert main(['readme', str(run), '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert '| VLV | 0.91 | 0.7 |' in text and 'nothing yet' not in text and text.endswith('## Next\n')
    assert '![Outside figure](nbs/images/results-toy.png)' in text and (tmp_path / 'nbs' / 'images' / 'results-toy.png').is_file()
    assert 'commit `abcdef0123`' in text
    R.update_readme(run, readme, figure='PIL')
    assert readme.read_text().count(R.RESULTS_START) == 1 and '![PIL]' in readme.read_text()
    readme.write_text('no markers here')
    assert main(['readme', str(run), '--readme', str(readme)]) == 1
    assert main(['readme', str(tmp_path / 'nothing'), '--readme', str(readme)]) == 1


def test_project_readme_has_one_results_block(repo):
    text = (repo / 'README.md').read_text()
    assert text.count(R.RESULTS_START) == 1 and text.count(R.RESULTS_END) == 1
    assert text.index(R.RESULTS_START) < text.index(R.RESULTS_END)
