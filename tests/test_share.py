"""Sharing vlv models through the Hub (nbs/94_share), offline: a local folder stands in for the Hub."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, Florence2Config

from vlv.core import CommandError, get_config, save_json
from vlv.miniature import ensure_miniature
from vlv.reference import import_reference, standin_state
from vlv.share import hub_model, model_card, push_to_hub


class LocalHub:
    "create_repo / upload_folder / snapshot_download over a folder."
    def __init__(self, root: Path): self.root, self.calls = root, []
    def create_repo(self, repo_id, **kwargs): self.calls.append(('create', repo_id, kwargs)); return f'local://{repo_id}'
    def upload_folder(self, folder_path, repo_id, **kwargs): shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
    def snapshot_download(self, repo_id, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError
        if not (self.root / repo_id).is_dir(): raise LocalEntryNotFoundError(f'{repo_id} is not cached')
        return str(self.root / repo_id)


@pytest.fixture(scope='module')
def run_model(tmp_path_factory):
    "A small model where `vlv run` puts one (runs/NAME/model), with the run's manifest and metrics."
    cfg = get_config('mini'); ensure_miniature(cfg)
    fc, qc = Florence2Config.from_pretrained(cfg.encoder.pretrained), AutoConfig.from_pretrained(cfg.decode.lm)
    run = tmp_path_factory.mktemp('runs') / 'mini'
    folder = import_reference(standin_state(fc, qc, num_queries=4, text_width=cfg.bottleneck.text_width), run / 'model', base='mini')
    save_json(dict(argv=['vlv', 'run', '--preset', 'mini'], git=dict(commit='0123abc'), finished='2026-12-04'), run / 'manifest.json')
    save_json(dict(main=dict(object_f1=0.5)), run / 'metrics.json')
    return folder


def test_card_names_preset_data_metrics_command(run_model):
    card = model_card(run_model, 'me/model')
    for part in ('library_name: vlv', 'preset: `mini`', 'source: `webdataset`', '"object_f1": 0.5', 'vlv run --preset mini',
                 '0123abc', '--ckpt me/model'):
        assert part in card, part


def test_push_then_caption_by_id(run_model, tmp_path, monkeypatch):
    import huggingface_hub
    from vlv.cli import main
    hub = LocalHub(tmp_path / 'hub')
    assert push_to_hub(run_model, 'me/model', api=hub) == 'local://me/model'
    assert hub.calls[0][2]['private'] is True
    assert (tmp_path / 'hub' / 'me' / 'model' / 'README.md').is_file()
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', hub.snapshot_download)
    Image.new('RGB', (80, 60), (0, 200, 0)).save(tmp_path / 'green.png')
    assert main(['caption', str(tmp_path / 'green.png'), '--ckpt', 'me/model', '--out', str(tmp_path / 'c.json'),
                 '--max-new-tokens', '3', '--beams', '1', '--no-progress']) == 0
    assert list(json.loads((tmp_path / 'c.json').read_text())) == ['green.png']
    with pytest.raises(CommandError, match='hf download me/absent --local-dir DIR'): hub_model('me/absent')
    assert hub_model(run_model) == run_model   # a folder is used as it is


def test_push_refuses_non_models(tmp_path):
    with pytest.raises(FileNotFoundError): push_to_hub(tmp_path, 'me/model', api=LocalHub(tmp_path))
