"""Tests of vlv.experiments: study runs in worker processes give what they give one after another (tiny config, CPU).

nbs/06b_experiments checks the specs, the reuse of finished runs and the summaries, in one process.
"""
import pytest

from vlv.experiments import run_studies


def without_timings(summaries: dict) -> dict:
    "The summaries less what depends on the machine's speed."
    def strip(r):
        r = {k: v for k, v in r.items() if k != 'seconds'}
        if 'scores' in r:
            r['scores'] = {split: {k: v for k, v in s.items() if k != 'captions_per_second'} for split, s in r['scores'].items()}
        return r
    return {name: strip(r) for name, r in summaries.items()}


@pytest.mark.slow
def test_stage1_studies_in_parallel_equal_studies_in_turn(tiny_cfg, tiny_decoder, tmp_path):
    "The query ablation's short runs give the same summaries in two worker processes as one after another here."
    cfgs = {n: tiny_cfg(f'encoder.readout=queries encoder.num_queries={n} stage1.steps=2 stage1.checkpoint_every=2 '
                        'stage1.sample_every=2') for n in (2, 4)}
    # API: one runner for both stages (was vlv.stage1.study_runs(cfgs, folder, decoder, n_scenes, guidance, workers))
    serial = run_studies(1, cfgs, tmp_path / 'a', workers=1, decoder=tiny_decoder, progress=False, n_scenes=4, guidance=1.0)
    parallel = run_studies(1, cfgs, tmp_path / 'b', workers=2, progress=False, n_scenes=4, guidance=1.0)
    assert without_timings(serial) == without_timings(parallel)
    assert [r['steps'] for r in serial.values()] == [2, 2]


@pytest.mark.slow
def test_stage2_studies_in_parallel_equal_studies_in_turn(tiny_cfg, tmp_path):
    "Distinct stage-2 runs once, and the same summaries from two worker processes as from one."
    small = 'decode.steps=2 decode.eval_batch_size=4 experiments.study_scenes=4'
    jobs = {'psi+lm': tiny_cfg(small), 'again': tiny_cfg(small), 'psi': tiny_cfg(small, 'decode.train=psi')}
    # API: one runner for both stages (was vlv.eval.run_studies(jobs, folder, workers, progress))
    serial = run_studies(2, jobs, tmp_path / 'serial', workers=1, progress=False)
    parallel = run_studies(2, jobs, tmp_path / 'parallel', workers=2, progress=False)
    assert len(list((tmp_path / 'parallel').iterdir())) == 2   # 'again' is 'psi+lm': trained once
    assert without_timings(serial) == without_timings(parallel)
