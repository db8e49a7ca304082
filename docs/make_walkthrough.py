"""Writes docs/walkthrough.ipynb (run: python docs/make_walkthrough.py).

The notebook composes the pure functions by hand on real Fashion-MNIST. Its
first cell reads WALKTHROUGH_SMOKE so the test suite can execute it quickly.
"""

import os

import nbformat
from nbformat import v4

CELLS = [
    ('md', """# lowrank_jax walkthrough

Compose the pure transforms by hand: load Fashion-MNIST (offline, Debian's
`dataset-fashion-mnist`), train a small model briefly, `overparameterize`,
train with `orthogonal_penalty`, `collapse`, `vbmf_ranks`, `tucker2_split`,
evaluate, plot. Every transform takes a variables tree and returns a new one;
`lj.apply(model, ...)` runs all of them with the same model object."""),
    ('code', """import os
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
import lowrank_jax as lj
from lowrank_jax.train import data  # the tool's data loading (numpy batches)

SMOKE = os.environ.get('WALKTHROUGH_SMOKE') == '1'
STEPS = 60 if SMOKE else 600
ds = data.load_dataset('fashion_mnist_local', validation_size=1000,
                       train_subset=4096 if SMOKE else None,
                       test_subset=1000 if SMOKE else None)
print(data.describe(ds))"""),
    ('code', """model = lj.get_model('lenet5')
x0 = jnp.zeros((1, 28, 28, 1))
variables = model.init(jax.random.PRNGKey(0), x0)
print('params:', lj.count_params(variables),
      'MACs/image:', lj.count_flops(model, variables, x0.shape).total)"""),
    ('code', """def batches(seed=0):
  epoch = 0
  while True:
    yield from data.iterate_batches(ds.train, 128, mean=ds.mean, std=ds.std,
                                    seed=seed, epoch=epoch)
    epoch += 1

def fit(variables, steps, penalty_weight=0.0, lr=1e-3):
  \"\"\"A plain Optax loop; the penalty is folded into the jitted loss.\"\"\"
  tx = optax.adam(lr)
  params, opt = variables['params'], tx.init(variables['params'])

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      logits = lj.apply(model, {'params': p}, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + penalty_weight * lj.orthogonal_penalty(p), ce
    (loss, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, ce

  for i, (x, y) in zip(range(steps), batches()):
    params, opt, ce = step(params, opt, x, y)
  print(f'last cross-entropy {float(ce):.3f}')
  return {'params': params}

def accuracy(variables):
  correct = 0
  for x, y in data.iterate_batches(ds.test, 500, mean=ds.mean, std=ds.std,
                                   drop_remainder=False):
    correct += int((lj.apply(model, variables, x).argmax(-1) == y).sum())
  return correct / len(ds.test.labels)

baseline = fit(variables, STEPS)
print('baseline accuracy', accuracy(baseline))"""),
    ('md', """## He et al. 2024: over-parameterize, train with the orthogonality penalty

`overparameterize` writes each conv as `op_in · op_core · op_out` whose product
is exactly the kernel, so the function is unchanged at that moment."""),
    ('code', """over = lj.overparameterize(variables, expansion=1.5, select=['conv.*', 'fc.*'],
                          key=jax.random.PRNGKey(1))
x = jnp.asarray(next(data.iterate_batches(ds.test, 8, mean=ds.mean, std=ds.std))[0])
print('same function:', float(jnp.max(jnp.abs(lj.apply(model, over, x) - lj.apply(model, variables, x)))))
print('forms:', lj.layer_forms(over))
print('penalty at the transform:', float(lj.orthogonal_penalty(over)))
over = fit(over, STEPS, penalty_weight=1e-2)
print('penalty after training:', float(lj.orthogonal_penalty(over)))
dense = lj.collapse(over)
print('over-parameterized accuracy', accuracy(dense))"""),
    ('md', """## VBMF ranks and Tucker-2

`vbmf_ranks` computes every layer's ranks in one call, compiled once per set of shapes; convs get
`(rank_in, rank_out)` from their two channel unfoldings."""),
    ('code', """ranks, details = lj.vbmf_ranks(dense, select=['conv2', 'fc.*'], report=True)
print(ranks)
split = lj.decompose(dense, ranks)  # Tucker-2 for (R_in, R_out), SVD for (R,)
print('forms:', lj.layer_forms(split))
print('params', lj.count_params(dense), '->', lj.count_params(split))
print('MACs', lj.count_flops(model, dense, x0.shape).total, '->',
      lj.count_flops(model, split, x0.shape).total)
print('accuracy right after the split', accuracy(split))
split = fit(split, STEPS // 2, lr=3e-4)
print('after fine-tuning', accuracy(split))"""),
    ('code', """fig, axes = plt.subplots(1, len(details), figsize=(3.2 * len(details), 2.6))
for ax, (path, d) in zip(np.atleast_1d(axes), details.items()):
  for i, s in enumerate(d['singular_values']):
    ax.semilogy(np.asarray(s), f'C{i}.-', ms=2)
    ax.axhline(float(d['threshold'][i]), color=f'C{i}', ls='--')
  ax.set_title(path)
fig.tight_layout()"""),
    ('md', """## Your own model

The built-in models are plain linen; so can yours be. Any model whose layers
are `nn.Conv` / `nn.Dense` runs a transformed tree through `lj.apply`, each
layer with its own strides and padding (here `CIRCULAR`)."""),
    ('code', """import flax.linen as nn

class MyNet(nn.Module):  # plain linen: nothing from lowrank_jax
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), padding='CIRCULAR')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))

mine = MyNet()
mine_vars = mine.init(jax.random.PRNGKey(1), x0)
mine_split = lj.decompose(mine_vars, {'Conv_1': (8, 16), 'Dense_0': (16,)})
print('forms:', lj.layer_forms(mine_split))
print('params', lj.count_params(mine_vars), '->', lj.count_params(mine_split))
print('MACs', lj.count_flops(mine, mine_vars, x0.shape).total, '->',
      lj.count_flops(mine, mine_split, x0.shape).total)
print('logits', lj.apply(mine, mine_split, x).shape)"""),
]


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3',
                               'language': 'python'}
  for kind, text in CELLS:
    nb.cells.append(v4.new_markdown_cell(text) if kind == 'md'
                    else v4.new_code_cell(text))
  return nb


if __name__ == '__main__':
  path = os.path.join(os.path.dirname(__file__), 'walkthrough.ipynb')
  nbformat.write(build(), path)
  print('wrote', path)
