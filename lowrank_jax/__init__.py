"""lowrank_jax: low-rank and tensor-network compression of CNNs in JAX/Flax.

Pure transforms of Flax parameter trees and NNX modules
(``overparameterize``, ``vbmf_ranks``, ``tucker2_split``, ``svd_split``,
``cp_split``, ``collapse``), the orthogonality penalty and counting. Any
linen model whose layers are ``nn.Conv`` / ``nn.Dense`` runs a transformed
tree through ``lj.apply(model, variables, x)``; a transformed NNX module is a
new module that runs as it is.
"""

from lowrank_jax import forms
from lowrank_jax.adtn import (adtn_encode, adtn_param_count, adtn_unshare,
                              ADTNLayerAction, decode_time)
from lowrank_jax.counting import count_flops, count_params, FlopsReport
from lowrank_jax.runner import apply, bind_apply
from lowrank_jax.models import get_model, MODELS
from lowrank_jax.nnx_surgery import FormLayer
from lowrank_jax.penalties import orthogonal_penalty
from lowrank_jax.speed import never_slower, round_ranks, time_layers
from lowrank_jax.transforms import (collapse, cp_split, decompose,
                                    layer_forms,
                                    LayerAction, overparameterize, svd_split,
                                    tucker2_split)
from lowrank_jax.tree import layers, select_paths
from lowrank_jax.vbmf import evbmf, EVBMFResult, vbmf_ranks, weakened_rank

__version__ = '0.1.0'

__all__ = [
    'FlopsReport', 'FormLayer', 'apply', 'bind_apply', 'LayerAction', 'MODELS', 'collapse',
    'count_flops', 'count_params', 'cp_split', 'decompose', 'forms', 'get_model',
    'layer_forms', 'layers', 'orthogonal_penalty', 'overparameterize',
    'select_paths', 'svd_split', 'tucker2_split', 'evbmf', 'EVBMFResult',
    'vbmf_ranks', 'weakened_rank', 'adtn_encode', 'adtn_param_count',
    'ADTNLayerAction', 'adtn_unshare', 'decode_time', 'never_slower',
    'round_ranks', 'time_layers',
]
