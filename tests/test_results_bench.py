"""bench/results.py rows and the frontier section of docs/results.md.

Synthetic reports and rows only: nothing trains (the runner is replaced).
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'bench'))
# pylint: disable=g-import-not-at-top,wrong-import-position
import results
import results_rows
import write_frontier_md as frontier
# pylint: enable=g-import-not-at-top,wrong-import-position

ISSUE_FIELDS = ('model', 'pipeline', 'seed', 'baseline_acc', 'final_acc',
                'flops_ratio', 'params_ratio', 'params', 'command')


def write_report(workdir, stages):
  """A report.json with ``stages``: [(name, test accuracy, params, flops)]."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump({'stages': [{'name': n, 'test': {'accuracy': a}, 'params': p,
                           'flops': fl, 'wall_s': 1.0}
                          for n, a, p, fl in stages]}, f)


def direct_report(workdir, baseline=0.93, final=0.925, flops=250):
  write_report(workdir, [('baseline', baseline, 1000, 1000),
                         ('compress', 0.5, 300, flops),
                         ('finetune', final, 300, flops)])


def he2024_report(workdir, collapse=0.935, final=0.928):
  write_report(workdir, [('overparameterize', 0.1, 1200, 1000),
                         ('orthogonal_train', collapse, 1200, 1000),
                         ('collapse', collapse, 1000, 1000),
                         ('compress', 0.6, 300, 250),
                         ('finetune', final, 300, 250)])


def fake_runner(calls, make_report):
  """A stand-in for results.run: records the command and writes the
  report that ``make_report(workdir)`` makes."""
  def run(args, log, timeout=None):
    del timeout
    calls.append(args)
    make_report(os.path.dirname(log) + os.sep + os.path.basename(log)[:-4])
    return ' '.join(['python'] + args[1:]), 2.0
  return run


def test_rows_keep_the_issue_fields_and_he2024_the_direct_baseline(
    tmp_path, monkeypatch):
  def make(workdir):
    (he2024_report if 'he2024' in workdir else direct_report)(workdir)
  monkeypatch.setattr(results, 'run', fake_runner([], make))
  out = tmp_path / 'results.json'
  results.main(['--models', 'vgg7b', '--pipelines', 'direct', 'he2024',
                '--seeds', '0', '--root', str(tmp_path), '--results',
                str(out)])
  rows = json.loads(out.read_text())
  assert set(rows) == {'vgg7b/direct/0', 'vgg7b/he2024/0'}
  for row in rows.values():
    assert all(row.get(k) is not None for k in ISSUE_FIELDS), row
  he = rows['vgg7b/he2024/0']
  assert he['baseline_acc'] == 0.93          # the direct run's baseline
  assert he['trained_acc'] == 0.935          # its own collapsed network
  assert he['target'] == 4.0 and he['flops_ratio'] == 4.0


def test_refresh_fills_baseline_acc_from_reports_and_rows(tmp_path):
  direct_report(str(tmp_path / 'vgg7b_direct_s0'), baseline=0.931)
  he2024_report(str(tmp_path / 'vgg7b_he2024_s0'))
  def old_row(pipeline, workdir, trained):   # written before baseline_acc
    return dict(model='vgg7b', pipeline=pipeline, seed=0, trained_acc=trained,
                final_acc=0.9, flops_ratio=4.0, params_ratio=3.0, params=300,
                run_s=1.0, command=f'python train.py --workdir={workdir}')
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({
      'vgg7b/direct/0': old_row('direct', tmp_path / 'vgg7b_direct_s0', 0.1),
      'vgg7b/he2024/0': old_row('he2024', tmp_path / 'vgg7b_he2024_s0', 0.1),
      # Workdirs gone: the numbers stay, baseline_acc comes from the rows.
      'lenet5/musco/0': dict(old_row('musco', tmp_path / 'gone', 0.89),
                             model='lenet5'),
      'lenet5/he2024/0': dict(old_row('he2024', tmp_path / 'gone2', 0.90),
                              model='lenet5')}))
  results.main(['--refresh', '--results', str(path)])
  rows = json.loads(path.read_text())
  assert rows['vgg7b/direct/0']['baseline_acc'] == 0.931
  assert rows['vgg7b/direct/0']['trained_acc'] == 0.931   # re-summarized
  assert rows['vgg7b/he2024/0']['baseline_acc'] == 0.931
  assert rows['vgg7b/he2024/0']['command'].startswith('python train.py')
  assert rows['lenet5/musco/0']['baseline_acc'] == 0.89
  assert rows['lenet5/he2024/0']['baseline_acc'] is None   # no direct row


def test_refresh_keeps_a_row_whose_workdir_was_started_again(tmp_path,
                                                              capsys):
  # The workdir was lost and its run started again: only the baseline is
  # done. Re-reading it would turn the finished row into the baseline.
  workdir = tmp_path / 'vgg7w_direct_s0'
  write_report(str(workdir), [('baseline', 0.94, 1000, 1000)])
  row = dict(model='vgg7w', pipeline='direct', seed=0, baseline_acc=0.943,
             trained_acc=0.943, after_compress_acc=0.6, final_acc=0.935,
             flops_ratio=4.25, params_ratio=4.2, params=300, run_s=1.0,
             command=f'python train.py --workdir={workdir}')
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({'vgg7w/direct/0': row}))
  results.main(['--refresh', '--results', str(path)])
  assert json.loads(path.read_text())['vgg7w/direct/0'] == row
  assert 'vgg7w/direct/0: kept' in capsys.readouterr().out


def test_ablation_uniform_run_takes_the_ratio_evbmf_reached(
    tmp_path, monkeypatch, capsys):
  os.makedirs(tmp_path / 'vgg7b_direct_s0' / 'stages' / 'baseline')
  argv = ['--models', 'vgg7b', '--ablation', '--seeds', '0', '--root',
          str(tmp_path), '--results', str(tmp_path / 'results.json')]
  results.main(argv + ['--dry-run'])
  assert ('target_ratio=<FLOPs ratio of vgg7b/direct_evbmf/0>'
          in capsys.readouterr().out)
  calls = []
  monkeypatch.setattr(results, 'run', fake_runner(
      calls, lambda w: direct_report(w, flops=300)))   # 1000 / 300 FLOPs
  results.main(argv)
  evbmf, uniform = calls
  assert '--config.compress.rank_rule=vbmf' in evbmf
  assert not any('target_ratio' in a for a in evbmf)
  assert '--config.compress.rank_rule=flops_ratio' in uniform
  assert '--config.compress.target_ratio=3.3333' in uniform
  baseline = ('--config.compress.pretrained='
              f'{tmp_path}/vgg7b_direct_s0/stages/baseline')
  assert baseline in evbmf and baseline in uniform
  rows = json.loads((tmp_path / 'results.json').read_text())
  assert rows['vgg7b/direct_uniform@evbmf/0']['pipeline'] == 'direct_uniform'
  assert rows['vgg7b/direct_evbmf/0']['baseline_acc'] == 0.93



def test_long_finetune_rows_start_from_the_plain_rows_stages(
    tmp_path, monkeypatch):
  for name, stage in (('vgg7b_direct_s0', 'baseline'),
                      ('vgg7b_he2024_s0', 'collapse')):
    os.makedirs(tmp_path / name / 'stages' / stage)
  calls = []
  monkeypatch.setattr(results, 'run', fake_runner(
      calls, lambda w: (he2024_report if 'he2024' in w else direct_report)(w)))
  direct_report(str(tmp_path / 'vgg7b_direct_s0'))   # baseline_acc source
  results.main(['--models', 'vgg7b', '--finetune-epochs', '10', '--targets',
                '4', '6', '--seeds', '0', '--pipelines', 'he2024', 'direct',
                '--root', str(tmp_path), '--results',
                str(tmp_path / 'results.json')])
  assert len(calls) == 4
  for args in calls:
    assert '--config.finetune.num_epochs=10' in args
    assert '--config.musco.finetune_epochs=3' in args   # unchanged
  he_4x, he_6x, direct_4x, _ = calls
  collapse = f'{tmp_path}/vgg7b_he2024_s0/stages/collapse'
  assert f'--config.he2024.trained={collapse}' in he_4x
  assert f'--config.he2024.trained={collapse}' in he_6x
  assert '--config.compress.target_ratio=6.0' in he_6x
  assert ('--config.compress.pretrained='
          f'{tmp_path}/vgg7b_direct_s0/stages/baseline') in direct_4x
  rows = json.loads((tmp_path / 'results.json').read_text())
  assert sorted(rows) == ['vgg7b/direct_ft10@4x/0', 'vgg7b/direct_ft10@6x/0',
                          'vgg7b/he2024_ft10@4x/0', 'vgg7b/he2024_ft10@6x/0']
  row_ = rows['vgg7b/he2024_ft10@4x/0']
  assert (row_['pipeline'], row_['target'], row_['finetune_epochs']) == (
      'he2024_ft10', 4.0, 10)
  assert row_['baseline_acc'] == 0.93   # the same seed's direct baseline


def test_distilled_long_finetune_rows_are_their_own_rows(tmp_path,
                                                         monkeypatch):
  os.makedirs(tmp_path / 'vgg7b_he2024_s0' / 'stages' / 'collapse')
  calls = []
  monkeypatch.setattr(results, 'run', fake_runner(calls, he2024_report))
  results.main(['--models', 'vgg7b', '--finetune-epochs', '10', '--targets',
                '4', '--seeds', '0', '--pipelines', 'he2024', '--distill',
                '0.5', '--root', str(tmp_path), '--results',
                str(tmp_path / 'results.json')])
  (args,) = calls
  assert '--config.finetune.distill_weight=0.5' in args
  assert f'--workdir={tmp_path}/vgg7b_he2024_ft10_kd0.5_s0_4x' in args
  rows = json.loads((tmp_path / 'results.json').read_text())
  row_ = rows['vgg7b/he2024_ft10_kd0.5@4x/0']
  assert (row_['pipeline'], row_['distill_weight']) == ('he2024_ft10_kd0.5',
                                                        0.5)


@pytest.mark.parametrize('argv,message', [
    (['--finetune-epochs', '0'], '--finetune-epochs 0: must be >= 1'),
    (['--finetune-epochs', '5', '--ablation'], 'give one of them'),
    (['--distill', '0.5'], '--distill 0.5: a weight in (0, 1] for the '
     '--finetune-epochs rows'),
    (['--finetune-epochs', '5', '--distill', '2'], '--distill 2.0')])
def test_long_finetune_bad_flags_are_refused(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit):
    results.main(['--models', 'vgg7b', '--root', str(tmp_path), '--dry-run']
                 + argv)
  assert message in capsys.readouterr().err


def row(pipeline, seed, final, *, target=None, ratio=None, base=0.932,
        params=20_000):
  return dict(model='vgg7b', pipeline=pipeline, seed=seed, target=target,
              final_acc=final, baseline_acc=base, trained_acc=base,
              after_compress_acc=0.5, flops_ratio=ratio or target or 5.0,
              params_ratio=3.0, params=params, run_s=1.0, command='python')


@pytest.mark.parametrize('finals,base,verdict', [
    ((0.929, 0.930), 0.932, 'met'),       # 0.25 points below
    ((0.920, 0.922), 0.932, 'not met'),   # 1.1 points below
    ((0.925, 0.926), 0.928, 'not met'),   # close, but a baseline < 93%
])
def test_goal_half_point_met_or_not(finals, base, verdict):
  rows = [row('direct', s, f, target=4.0, base=base)
          for s, f in enumerate(finals)]
  rows.append(row('direct', 0, 0.931, target=2.0, base=base))  # < 4x: no
  text = frontier.goal_half_point(rows)[0]
  assert f'on a ≥ 93% baseline: {verdict}.**' in text


def test_goals_not_measured_without_rows():
  assert 'not measured yet' in frontier.goal_half_point(
      [row('direct', 0, 0.93, target=2.0)])[0]
  assert 'not measured yet' in frontier.goal_small([])[0]
  assert 'not measured yet' in frontier.he2024_vs_direct([])[0].lower()
  assert 'not measured yet' in frontier.musco_vs_direct([])[0].lower()


def test_goal_small_uses_the_mean_over_seeds():
  rows = [row('direct', 0, 0.932, target=2.0),
          row('direct', 1, 0.927, target=2.0),      # mean 92.95: not met
          row('musco', 0, 0.95, params=150_000)]    # too large to count
  assert 'test accuracy: not met.**' in frontier.goal_small(rows)[0]
  rows[1]['final_acc'] = 0.931
  assert 'test accuracy: met.**' in frontier.goal_small(rows)[0]


def test_he2024_vs_direct_within_or_beyond_the_seeds_spread():
  rows = [row('direct', 0, 0.920, target=4.0), row('direct', 1, 0.926,
                                                   target=4.0),
          row('he2024', 0, 0.922, target=4.0), row('he2024', 1, 0.926,
                                                   target=4.0)]
  assert "within the seeds' spread" in frontier.he2024_vs_direct(rows)[0]
  for r in rows[2:]:
    r['final_acc'] += 0.01
  assert "he2024 ahead beyond the seeds' spread" in frontier.he2024_vs_direct(
      rows)[0]
  assert 'spread unknown' in frontier.he2024_vs_direct(rows[::2])[0]
  # One he2024 seed against two direct seeds: compared on the shared seed
  # only, and no spread claimed.
  text = frontier.he2024_vs_direct(rows[:3])[0]
  assert '+1.20 points (he2024 − direct; per seed 0: +1.20; one seed' in text


def test_musco_is_compared_with_direct_interpolated_at_its_ratio():
  rows = [row('direct', 0, 0.92, target=2.0), row('direct', 0, 0.90,
                                                  target=4.0),
          row('musco', 0, 0.915, ratio=2 ** 1.5)]    # halfway in log ratio
  acc, how = frontier.direct_at(rows[:2], 2 ** 1.5)
  assert acc == pytest.approx(0.91) and 'interpolated' in how
  assert '+0.50 points' in frontier.musco_vs_direct(rows)[0]
  _, how = frontier.direct_at(rows[:2], 1.9)
  assert 'nearest row, at 2.00×' in how
  # Far outside direct's rows: nothing to compare with, and said so.
  assert frontier.direct_at(rows[:2], 11.0) == (
      None, 'not compared: its rows span 2.00×–4.00×')
  far = rows[:2] + [row('musco', 0, 0.915, ratio=11.0)]
  assert 'Not measured yet: no seed has direct rows at or near' in (
      frontier.musco_vs_direct(far)[0])


def test_section_writes_the_frontier_png_and_tables(tmp_path):
  rows = {f'k{i}': r for i, r in enumerate([
      row('direct', 0, 0.925, target=4.0), row('he2024', 0, 0.927,
                                               target=4.0),
      row('musco', 0, 0.92, ratio=3.1), row('direct_evbmf', 0, 0.91,
                                            ratio=1.7),
      row('direct_uniform', 0, 0.905, ratio=1.7, target=1.7),
      dict(row('he2024_ft10', 0, 0.929, target=4.0), finetune_epochs=10),
      dict(row('he2024_ft10_kd0.5', 0, 0.9305, target=4.0),
           finetune_epochs=10, distill_weight=0.5),
      dict(row('direct', 0, 0.5, target=4.0), device='GPU')])}   # not CPU
  lines = frontier.section(rows, results.SETTINGS, str(tmp_path))
  text = '\n'.join(lines)
  assert (tmp_path / 'frontier_vgg7b.png').stat().st_size > 1000
  assert '| 4× | he2024 | 0 | 93.20 | 93.20 | 50.00 → **92.70** |' in text
  assert '| its stages | musco |' in text
  assert 'EVBMF − uniform at EVBMF\'s ratio: +0.50 points' in text
  assert 'Fine-tuning after a split: 3 epochs at lr 0.01' in text
  assert 'One seed so far' in text and 'he2024 at the 2× target' in text
  assert ('| 4× | he2024 | 10 | 0 | 93.20 | **92.90** | 92.70 | +0.20 points '
          '(he2024_ft10 − schedule; per seed 0: +0.20; one seed') in text
  assert ('| 4× | he2024, distilled (0.5) | 10 | 0 | 93.20 | **93.05** | '
          '92.70 |') in text
  assert ('temperature 4) against the same 10 fine-tuning epochs without, '
          'at the 4× target: +0.15 points (he2024_ft10_kd0.5 − he2024_ft10'
          ) in text
  assert 'he2024_ft10_kd0.5 at the 4× target' in text   # the best at >= 4x
  assert frontier.long_label('he2024_ft10_kd0.5') == (
      'he2024, fine-tuned 10 epochs, distilled (0.5)')
  assert results_rows.row_name('vgg7b', 'direct_uniform@evbmf', 0, {})[1] == (
      'vgg7b_direct_uniform_evbmf_s0')


def test_section_names_a_seed_whose_rows_start_from_two_baselines(
    tmp_path):
  rows = {'a': row('direct', 0, 0.925, target=4.0, base=0.9432),
          'b': row('direct_evbmf', 0, 0.91, ratio=1.7, base=0.9399),
          'c': row('direct', 1, 0.925, target=4.0, base=0.9378),
          'd': row('he2024', 1, 0.925, target=4.0, base=0.9378)}
  text = '\n'.join(frontier.section(rows, results.SETTINGS, str(tmp_path)))
  assert ('Seed 0: its rows start from 2 trainings of the dense baseline '
          '(93.99% for direct_evbmf; 94.32% for direct at the 4× target); '
          'each row is compared with its own.') in text
  assert 'Seed 1:' not in text


# bench/results_adtn.py: the depth sweep.
import results_adtn  # pylint: disable=g-import-not-at-top,wrong-import-position
import write_results_md  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(name='adtn_root')
def fixture_adtn_root(tmp_path, monkeypatch):
  """results_adtn.ROOT at ``tmp_path``, with every row's baseline folder
  (empty: the rows' runs are replaced), as a clean clone has none."""
  for s in results_adtn.SETTINGS.values():
    if s.get('pretrained'):
      os.makedirs(tmp_path / s['pretrained'], exist_ok=True)
  monkeypatch.setattr(results_adtn, 'ROOT', str(tmp_path))
  return tmp_path


def test_adtn_depth_and_epochs_change_only_their_fields(adtn_root):
  del adtn_root
  row = results_adtn.row_overrides('fc2', 0)
  swept = results_adtn.row_overrides('fc2', 0, depth=16, train_epochs=8)
  assert row['adtn.depth'] == results_adtn.SETTINGS['fc2']['depth']
  assert (swept['adtn.depth'], swept['finetune.num_epochs']) == (16, 8)
  assert {k: v for k, v in swept.items()
          if k not in ('adtn.depth', 'finetune.num_epochs')} == {
              k: v for k, v in row.items()
              if k not in ('adtn.depth', 'finetune.num_epochs')}
  assert results_adtn.depth_workdir('r', 'fc2', 16, 0) == os.path.join(
      'r', 'depth', 'fc2_M16_s0')
  assert results_adtn.depth_workdir('r', 'fc2', 16, 1, 8) == os.path.join(
      'r', 'depth', 'fc2_M16_e8_s1')
  faster = results_adtn.row_overrides('fc2', 0, train_lr=0.01)
  assert faster['finetune.learning_rate'] == 0.01
  assert row['finetune.learning_rate'] == results_adtn.TRAIN_LR
  assert ({k: v for k, v in faster.items() if k != 'finetune.learning_rate'}
          == {k: v for k, v in row.items() if k != 'finetune.learning_rate'})
  assert results_adtn.depth_workdir('r', 'fc2', 4, 0, 24, 0.01) == (
      os.path.join('r', 'depth', 'fc2_M4_e24_lr0.01_s0'))


def test_adtn_sweep_rows_at_another_learning_rate_are_their_own_rows(
    adtn_root):
  del adtn_root
  old = sweep_row(4, 0.85, epochs=24)           # recorded before --train-lr
  fast = dict(sweep_row(4, 0.86, epochs=24), train_lr=0.01)
  runs = results_adtn.merge_sweep_row([old], fast)
  assert len(runs) == 2                          # not a replacement
  assert results_adtn.merge_sweep_row(runs, dict(fast, adtn_final_acc=0.87)
                                      )[-1]['adtn_final_acc'] == 0.87
  text = '\n'.join(write_results_md.adtn_depth_sweep({'runs': runs}))
  assert '| 24 | 0.003 | plain |' in text and '| 24 | 0.01 | plain |' in text
  assert 'closest M=4 24 epochs at lr 0.01: 86.00%' in text
  assert '--depth-sweep 4 --models fc2 --train-epochs 24 --train-lr 0.01' in (
      text)


def test_adtn_distilled_sweep_rows_are_their_own_rows(tmp_path, monkeypatch,
                                                     adtn_root):
  """--distill w: one more field, its own workdir and row, its own SVD side
  (distilled too), and a label and command that say so."""
  del adtn_root
  plain = results_adtn.row_overrides('fc2', 0, depth=8, train_epochs=24)
  kd = results_adtn.row_overrides('fc2', 0, depth=8, train_epochs=24,
                                  distill=0.5)
  assert kd == dict(plain, **{'finetune.distill_weight': 0.5})
  assert results_adtn.depth_workdir(
      'r', 'fc2', 8, 0, 24, 0.01, False, 0.5) == os.path.join(
          'r', 'depth', 'fc2_M8_e24_lr0.01_kd0.5_s0')
  old = sweep_row(8, 0.86, epochs=24)
  path = tmp_path / 'results_adtn.json'
  path.write_text(json.dumps({'_depth_sweep': {'runs': [old]}}))
  monkeypatch.setattr(results_adtn, 'RESULTS_JSON', str(path))
  olds = []
  def fake_row(key, seed, workdir, overrides, *, reuse=False, old=None):
    del key, seed, workdir, reuse
    olds.append(old)
    return dict(sweep_row(8, 0.885, epochs=24), distill_weight=overrides[
        'finetune.distill_weight'])
  monkeypatch.setattr(results_adtn, 'run_row', fake_row)
  results_adtn.depth_sweep(['fc2'], [8], seed=0, root='r', train_epochs=24,
                           distill=0.5)
  assert olds == [None]          # the plain row's SVD side is not distilled
  runs = json.loads(path.read_text())['_depth_sweep']['runs']
  assert len(runs) == 2
  text = '\n'.join(write_results_md.adtn_depth_sweep({'runs': runs}))
  assert '| fc2 | 8 | 24 | 0.003 | plain + distilled (0.5) | ' in text
  assert '| fc2 | 8 | 24 | 0.003 | plain | ' in text
  assert ('within 0.5 points of its baseline at M=8 24 epochs distilled '
          '(0.5): 88.50%') in text
  assert '--depth-sweep 8 --models fc2 --train-epochs 24 --distill 0.5`' in (
      text)


def test_adtn_normalized_sweep_rows_reuse_the_plain_rows_svd_side(
    tmp_path, monkeypatch, adtn_root):
  del adtn_root
  norm = results_adtn.row_overrides('lenet5', 0, depth=16, train_epochs=12,
                                    normalize=True)
  plain = results_adtn.row_overrides('lenet5', 0, depth=16, train_epochs=12)
  assert norm == dict(plain, **{'adtn.normalize': True})
  assert results_adtn.depth_workdir('r', 'lenet5', 16, 0, 12, None,
                                    True) == os.path.join(
                                        'r', 'depth', 'lenet5_M16_e12_norm_s0')
  path = tmp_path / 'results_adtn.json'
  twin = sweep_row(16, 0.1, epochs=12, key='lenet5', base=0.8976)
  other = dict(twin, train_lr=0.01)
  path.write_text(json.dumps({'_depth_sweep': {'runs': [other, twin]}}))
  monkeypatch.setattr(results_adtn, 'RESULTS_JSON', str(path))
  olds = []
  def fake_row(key, seed, workdir, overrides, *, reuse=False, old=None):
    del key, seed, workdir, reuse
    olds.append(old)
    return dict(twin, adtn_final_acc=0.895,
                normalize=overrides.get('adtn.normalize', False))
  monkeypatch.setattr(results_adtn, 'run_row', fake_row)
  results_adtn.depth_sweep(['lenet5'], [16], seed=0, root='r',
                           train_epochs=12, normalize=True)
  assert olds == [twin]          # the plain row at the same rate: its SVD
  # (a command that differs in its checkpoint period only trains the same)
  fields = results_adtn._training_fields  # pylint: disable=protected-access
  every = '--config.checkpoint_every_steps='
  assert fields(f'python train.py --config.seed=0 {every}0 '
                '--config.adtn.depth=8') == fields(
                    f'python train.py --config.seed=0 {every}1000 '
                    '--config.adtn.depth=16')
  assert fields('python train.py --config.seed=1') != fields(
      'python train.py --config.seed=0')
  runs = json.loads(path.read_text())['_depth_sweep']['runs']
  assert len(runs) == 3          # the plain rows stay, the new one is added
  text = '\n'.join(write_results_md.adtn_depth_sweep({'runs': runs}))
  assert '| lenet5 | 16 | 12 | 0.003 | normalized | ' in text
  assert '| lenet5 | 16 | 12 | 0.003 | plain | ' in text
  assert ('within 0.5 points of its baseline at M=16 12 epochs normalized: '
          '89.50%') in text
  assert ('--depth-sweep 16 --models lenet5 --train-epochs 12 --normalize`'
          in text)
  # A plain run whose kernels vanished is named, with its norms.
  runs[0]['kernel_norms'] = {'fc1': [13.5, 0.0193], 'fc2': [10.2, 9.0]}
  runs[-1]['kernel_norms'] = {'fc1': [13.5, 13.6]}
  text = '\n'.join(write_results_md.adtn_depth_sweep({'runs': runs}))
  assert ('lenet5: in M=16 12 epochs at lr 0.01 (10.00%: fc1 13.5 → 0.0193),'
          " the decoded kernels' norms fell more than 100-fold") in text
  assert ('With the normalized decode the norms stay at the learned scale: '
          'M=16 12 epochs normalized (89.50%: fc1 13.5 → 13.6).') in text


@pytest.mark.parametrize('params_after,rank', [(1089, 2), (1040, 1),
                                               (4353, 5), (8705, 9)])
def test_adtn_svd_rank_is_the_smallest_not_below_the_adtn(params_after, rank):
  import numpy as np  # pylint: disable=g-import-not-at-top
  layers = {'fc1': {'kernel': np.zeros((784, 256)), 'bias': np.zeros(256)}}
  encoded = {'fc1': {'params_after': params_after}}
  ranks = results_adtn.svd_budget_ranks(encoded, layers)
  assert ranks == {'fc1': rank}
  assert rank * 1040 >= params_after > (rank - 1) * 1040 or rank == 1


def test_adtn_svd_rank_of_a_shared_group_is_one_for_all():
  import numpy as np  # pylint: disable=g-import-not-at-top
  layers = {'fc1': {'kernel': np.zeros((400, 120))},
            'fc2': {'kernel': np.zeros((120, 84))}}
  encoded = {'fc1': {'params_after': 962}, 'fc2': {'params_after': 1}}
  # 963 parameters over 520 + 204 = 724 per rank: rank 2.
  assert results_adtn.svd_budget_ranks(encoded, layers, share=True) == {
      'fc1': 2, 'fc2': 2}


def sweep_row(depth, final, *, epochs=4, key='fc2', base=0.8859):
  return {'key': key, 'model': key, 'seed': 0, 'depth': depth,
          'train_epochs': epochs, 'command': f'python train.py M={depth}',
          'dense_params': 200704, 'adtn_params': 16 * 17 * depth + 1,
          'baseline_acc': base, 'adtn_after_encode_acc': 0.1,
          'adtn_final_acc': final, 'svd_ranks': {'fc1': depth // 2},
          'svd_factor_params': 1040 * (depth // 2), 'svd_after_split_acc': 0.2,
          'svd_final_acc': 0.87, 'svd_reused': False, 'adtn_train_s': 600.0,
          'run_s': 700.0}


def test_adtn_depth_sweep_records_rows_and_keeps_the_others(
    tmp_path, monkeypatch, adtn_root):
  del adtn_root
  path = tmp_path / 'results_adtn.json'
  path.write_text(json.dumps({'fc2': {'depth': 4}, '_depth_sweep': {
      'runs': [sweep_row(8, 0.5), sweep_row(32, 0.84)]}}))
  monkeypatch.setattr(results_adtn, 'RESULTS_JSON', str(path))
  calls = []
  def fake_row(key, seed, workdir, overrides, *, reuse=False, old=None):
    del old
    calls.append((workdir, overrides['adtn.depth'], reuse))
    return sweep_row(overrides['adtn.depth'], 0.85)
  monkeypatch.setattr(results_adtn, 'run_row', fake_row)
  results_adtn.depth_sweep(['fc2'], [8, 16], seed=0, root='r')
  assert calls == [(os.path.join('r', 'depth', 'fc2_M8_s0'), 8, True),
                   (os.path.join('r', 'depth', 'fc2_M16_s0'), 16, True)]
  saved = json.loads(path.read_text())
  assert saved['fc2'] == {'depth': 4}
  finals = {x['depth']: x['adtn_final_acc']
            for x in saved['_depth_sweep']['runs']}
  assert finals == {8: 0.85, 16: 0.85, 32: 0.84}   # M=8 replaced, 32 kept


@pytest.mark.parametrize('finals,verdict', [
    ({8: 0.84, 16: 0.8815}, 'within 0.5 points of its baseline at M=16'),
    ({8: 0.84, 16: 0.88}, '*not* within 0.5 points of its baseline in any '
                          'run (M=4 4 epochs, M=8 4 epochs, M=16 4 epochs); '
                          'closest M=16')])
def test_adtn_depth_sweep_table_states_the_half_point_goal(finals, verdict):
  main_rows = {'fc2': dict(sweep_row(4, 0.8245), svd_ranks={'fc1': 1}),
               'lenet5': sweep_row(4, 0.84, key='lenet5')}   # not swept
  for r in main_rows.values():
    del r['train_epochs'], r['seed'], r['svd_factor_params']  # older rows
  lines = write_results_md.adtn_depth_sweep(
      {'runs': [sweep_row(m, f) for m, f in finals.items()]}, main_rows)
  text = '\n'.join(lines)
  assert verdict in text
  assert '| fc2 (row above) | 4 | 4 | 0.003 | plain | 1,089 (200,704) |' in (
      text)
  assert '| 1 (–) |' in text and 'lenet5' not in text
  assert ('| fc2 | 16 | 4 | 0.003 | plain | 4,353 (200,704) | 88.59 | '
          '10.00 → **' in text)
  assert '| 8 (8,320) | 20.00 → **87.00** | 600 s |' in text
  assert '`python bench/results_adtn.py --depth-sweep 8 16 --models fc2`' in (
      text)


def test_distillation_check_has_its_own_section_and_runs(tmp_path):
  """docs/results_distill.json: the rows of one VM's seed, compared only
  with each other, with the goal computed on them and their commands."""
  def with_command(r, name):
    return dict(r, command=f'python train.py --workdir=runs/vm/{name}')
  rows = {
      'vgg7b/direct/0': with_command(
          row('direct', 0, 0.915, target=4.0, base=0.931), 'd'),
      'vgg7b/he2024/0': with_command(
          row('he2024', 0, 0.918, target=4.0, base=0.931), 'h'),
      'vgg7b/he2024_ft10@4x/0': with_command(dict(
          row('he2024_ft10', 0, 0.924, target=4.0, base=0.931),
          finetune_epochs=10), 'h10'),
      'vgg7b/he2024_ft10_kd0.5@4x/0': with_command(dict(
          row('he2024_ft10_kd0.5', 0, 0.927, target=4.0, base=0.931),
          finetune_epochs=10, distill_weight=0.5), 'h10kd')}
  path = tmp_path / 'results_distill.json'
  path.write_text(json.dumps(rows))
  lines = write_results_md._distill_lines  # pylint: disable=protected-access
  text = '\n'.join(lines(str(path)))
  assert '### Distillation on a split of vgg7b' in text
  assert ('`python bench/results.py --models vgg7b --seeds 0 --targets 4 '
          '--pipelines direct he2024 --root runs/vm --results '
          'docs/results_distill.json`') in text
  assert ('| 4× | he2024, distilled (0.5) | 10 | 0 | 93.10 | **92.70** | '
          '91.80 |') in text
  assert '+0.30 points (he2024_ft10_kd0.5 − he2024_ft10' in text
  assert ('with the best of these rows, on a ≥ 93% baseline: met.** Best '
          'at ≥ 4×: he2024_ft10_kd0.5 at the 4× target') in text
  assert '* `vgg7b/he2024_ft10_kd0.5@4x/0` (1 s): `python train.py' in text
  assert lines(str(tmp_path / 'none.json')) == []
