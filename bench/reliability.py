"""Tries bad input as a user would and writes docs/reliability.md.

Every case runs in its own process (the CLI, or a short Python program over
the library) on the offline Fashion-MNIST, with a bounded time. For each: the
command, the exit status, the error's first line, and whether anything was
lost (the files a case may touch are fingerprinted before and after).

Run:  python bench/reliability.py   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ['--config', 'configs/smoke.py', '--config.train_subset=512',
         '--config.validation_size=128', '--config.test_subset=200',
         '--config.num_epochs=1', '--config.progress=False']
DIRECT = SMOKE + ['--config.pipeline=direct', '--config.finetune.num_epochs=1',
                  '--config.compress.rank_rule=flops_ratio',
                  '--config.compress.target_ratio=1.3']


def _fingerprint(path: str) -> str:
  """A hash of every file under ``path`` (names and bytes)."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()[:12]


def _run(argv, cwd=ROOT):
  out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
  lines = [l for l in out.stderr.strip().splitlines()
           if 'Error' in l or 'error' in l]
  return out.returncode, (lines[-1] if lines else '')[:300]


def _cli(workdir, *flags):
  return [sys.executable, 'train.py', *flags, '--workdir', workdir]


def _lib(code):
  return [sys.executable, '-c', 'import jax, jax.numpy as jnp, numpy as np\n'
          'import lowrank_jax as lj\n' + code]


LENET = ("m = lj.get_model('lenet5'); v = m.init(jax.random.PRNGKey(0), "
         "jnp.zeros((1, 28, 28, 1)))\n")


def cases(work):
  """(name, argv, directory that must not change or None, expect failure)."""
  done = os.path.join(work, 'done')
  return [
      ('a finished workdir re-run with another model', _cli(
          done, *DIRECT, '--config.model=fc2'), done, True),
      ('a finished workdir re-run with learning_rate=-1', _cli(
          done, *DIRECT, '--config.learning_rate=-1'), done, True),
      ('an unknown model', _cli(os.path.join(work, 'new1'), *SMOKE,
                                '--config.model=foo'), None, True),
      ('a typo on the command line', _cli(
          os.path.join(work, 'new2'), *SMOKE, '--config.learnin_rate=5'),
       None, True),
      ('an invalid compress.select regex', _cli(
          os.path.join(work, 'new3'), *DIRECT, '--config.compress.select=(['),
       None, True),
      ('an unreachable FLOP target', _cli(
          os.path.join(work, 'new4'), *DIRECT,
          '--config.compress.target_ratio=50'), None, True),
      ('training that diverges (SGD, learning_rate=1e6)', _cli(
          os.path.join(work, 'new5'), *SMOKE, '--config.optimizer=sgd',
          '--config.learning_rate=1e6'), None, True),
      ('a garbled stages.json', None, done, True),
      ('a deleted stage directory', None, done, True),
      ('ranks (2.7, 4.9)', _lib(
          LENET + "lj.tucker2_split(v, {'conv2': (2.7, 4.9)})"), None, True),
      ('ranks for a dense layer given to tucker2_split', _lib(
          LENET + "lj.tucker2_split(v, {'fc1': (4, 4)})"), None, True),
      ('evbmf of a matrix with NaN', _lib(
          "y = np.ones((8, 20), np.float32); y[0, 0] = np.nan\n"
          "lj.evbmf(y)"), None, True),
      ('evbmf with sigma2=-1', _lib(
          "lj.evbmf(np.ones((8, 20), np.float32), sigma2=-1.0)"), None, True),
      ('evbmf of a 0 x 5 matrix', _lib(
          "lj.evbmf(np.ones((0, 5), np.float32))"), None, True),
      ('a split layer run as a grouped conv', _lib(
          "import flax.linen as nn\nc = nn.Conv(8, (3, 3), "
          "feature_group_count=2)\nx = jnp.ones((1, 6, 6, 4))\n"
          "v = c.init(jax.random.PRNGKey(0), x)\n"
          "lj.apply(c, lj.tucker2_split(v, (2, 2)), x)"), None, True),
  ]


def main():
  work = tempfile.mkdtemp(prefix='lowrank_jax_reliability_')
  done = os.path.join(work, 'done')
  code, err = _run(_cli(done, *DIRECT))
  assert code == 0, err
  rows = []
  for name, argv, guard, expect_fail in cases(work):
    before = _fingerprint(guard) if guard else None
    backup = None
    if name == 'a garbled stages.json':
      index = os.path.join(done, 'stages.json')
      backup = open(index).read()
      with open(index, 'w') as f:
        f.write(backup[:40])
      before = _fingerprint(guard)
      argv = _cli(done, *DIRECT)
    if name == 'a deleted stage directory':
      shutil.move(os.path.join(done, 'stages', 'compress'),
                  os.path.join(work, 'compress.moved'))
      before = _fingerprint(guard)
      argv = _cli(done, *DIRECT)
    code, err = _run(argv)
    after = _fingerprint(guard) if guard else None
    if backup is not None:
      with open(os.path.join(done, 'stages.json'), 'w') as f:
        f.write(backup)
    if name == 'a deleted stage directory':
      shutil.move(os.path.join(work, 'compress.moved'),
                  os.path.join(done, 'stages', 'compress'))
    own = [a for a in argv if a.startswith(os.path.join(work, 'new'))]
    created = [d for d in own if os.path.exists(d)]
    lost = ('workdir unchanged' if guard and before == after else
            'workdir CHANGED' if guard else
            'no workdir' if not own else
            'nothing written' if not created else
            f'wrote {os.path.basename(created[0])}')
    ok = (code != 0) == expect_fail
    command = ' '.join(a if ' ' not in a and '\n' not in a else repr(a)
                       for a in argv).replace(sys.executable, 'python')
    command = command.replace(work, 'WORK')
    rows.append((name, command, code,
                 err.replace(work, 'WORK').replace('|', '/'), lost, ok))
    print(f'{name}: exit {code}, {lost}: {err[:120]}', flush=True)
  date = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  lines = [
      '# Reliability: bad input, tried as a user would',
      '',
      f'Generated by `python bench/reliability.py` ({date}); nothing typed '
      'in by hand. WORK is a fresh temporary directory; `WORK/done` holds a '
      'finished `direct` job on the smoke settings, fingerprinted (every '
      "file's name and bytes) before and after each case that reruns it. "
      'Kill-and-resume, corrupt checkpoints and device-count changes are '
      'covered by the test suite (tests/test_pipelines.py, '
      'tests/test_training.py, tests/test_reliability.py, '
      'tests/test_multihost.py).',
      '',
      '| case | command | exit | error | nothing lost? | as expected |',
      '|---|---|---:|---|---|---|',
  ]
  for name, command, code, err, lost, ok in rows:
    lines.append(f'| {name} | `{command}` | {code} | {err} | {lost} | '
                 f'{"yes" if ok else "NO"} |')
  with open(os.path.join(ROOT, 'docs', 'reliability.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
