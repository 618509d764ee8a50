"Config overrides on the command line: `-o` (vlv.core.add_overrides_argument) and `get_config`, as every command uses them."
import argparse

import pytest

from vlv.core import add_overrides_argument, get_config, parse_overrides


def command(argv: list[str]):
    "Parse `argv` like a command with --preset and -o does, and build its config."
    parser = argparse.ArgumentParser(prog='vlv stage1')
    parser.add_argument('--preset', default='smoke')
    add_overrides_argument(parser)
    args = parser.parse_args(argv)
    return args, get_config(args.preset, args.overrides)


def test_repeated_o_accumulate():
    "The issue's command line: every -o counts, not only the last."
    args, cfg = command(['--preset', 'toy', '-o', 'stage1.steps=20', '-o', 'data.source=jsonl', '-o', 'data.path=manifest.jsonl'])
    assert args.overrides == ['stage1.steps=20', 'data.source=jsonl', 'data.path=manifest.jsonl']
    assert (cfg.stage1.steps, cfg.data.source, cfg.data.path) == (20, 'jsonl', 'manifest.jsonl')


def test_one_o_takes_several_items():
    _, cfg = command(['-o', 'stage1.steps=20', 'encoder.num_queries=8', '-o', 'run.seed=3'])
    assert (cfg.stage1.steps, cfg.encoder.num_queries, cfg.run.seed) == (20, 8, 3)
    _, cfg = command(['-o', 'stage1.steps=20 encoder.num_queries=8'])   # one quoted item, as the old help suggested
    assert (cfg.stage1.steps, cfg.encoder.num_queries) == (20, 8)
    _, cfg = command([])
    assert cfg == get_config('smoke')


def test_help_shows_key_value():
    parser = argparse.ArgumentParser(prog='vlv stage1')
    add_overrides_argument(parser)
    assert '-o KEY=VALUE [KEY=VALUE ...], --override KEY=VALUE [KEY=VALUE ...]' in parser.format_help()


def test_repeated_key_last_wins():
    "A later -o refines an earlier one (documented in nbs/00_core)."
    _, cfg = command(['-o', 'stage1.steps=20', 'run.seed=1', '-o', 'stage1.steps=30'])
    assert (cfg.stage1.steps, cfg.run.seed) == (30, 1)


def test_stray_word_is_named(capsys):
    "An item that is not KEY=VALUE (here a path swallowed by -o) stops argparse with its name."
    with pytest.raises(SystemExit):
        command(['-o', 'stage1.steps=20', 'photo.png'])
    assert "argument -o/--override: 'photo.png' is not KEY=VALUE" in capsys.readouterr().err


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="did you mean 'stage1.steps'"):
        command(['-o', 'stage1.stpes=20'])


def test_ignored_key_is_an_error_naming_it():
    "data.path means nothing to the Shapes world; the Shapes sizes mean nothing to a real source."
    with pytest.raises(ValueError, match=r"override data\.path: data\.source='shapes' ignores it.*set data\.source"):
        command(['--preset', 'toy', '-o', 'data.path=photos'])
    with pytest.raises(ValueError, match=r"override data\.n_train, data\.caption_fraction: data\.source='folder' ignores it"):
        command(['-o', 'data.source=folder', 'data.path=photos', '-o', 'data.n_train=100', 'data.caption_fraction=0.5'])
    with pytest.raises(ValueError, match=r"override data\.heldout_combos: data\.source='webdataset'"):
        command(['--preset', 'paper', '-o', 'data.heldout_combos=[]'])   # the paper preset reads shards


def test_keys_the_setting_reads_are_fine():
    "Only overrides are checked: a preset's own values never are, and a key that the source reads passes."
    for preset in ('smoke', 'toy', 'paper'):
        assert get_config(preset).preset == preset
    _, cfg = command(['--preset', 'paper', '-o', 'data.source=shapes', 'data.n_train=8'])   # paper's data.path stays, unread
    assert (cfg.data.source, cfg.data.n_train) == ('shapes', 8)
    _, cfg = command(['-o', 'data.source=folder', 'data.path=photos', 'data.image_size=128'])   # image_size: every source
    assert (cfg.data.path, cfg.data.image_size) == ('photos', 128)


def test_notebook_string_form_goes_through_the_same_parser():
    "`vlv run -p cfg_overrides '...'` hands notebooks one string; it gives the config and the errors the -o list gives."
    argv = ['-o', 'stage1.steps=20', 'encoder.prompt=describe the image.', '-o', 'data.heldout_combos=["red circle"]']
    args, cfg = command(argv)
    text = ' '.join(args.overrides)
    assert parse_overrides(text) == parse_overrides(args.overrides)
    assert get_config('smoke', text) == cfg
    assert cfg.encoder.prompt == 'describe the image.' and cfg.data.heldout_combos == ('red circle',)
    with pytest.raises(ValueError, match=r"override data\.path: data\.source='shapes' ignores it"):
        get_config('toy', 'stage1.steps=20 data.path=photos')
