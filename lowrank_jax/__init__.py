"""lowrank_jax: low-rank and tensor-network compression of CNNs in JAX/Flax.

Pure transforms of Flax parameter trees and NNX modules
(``overparameterize``, ``vbmf_ranks``, ``tucker2_split``, ``svd_split``,
``cp_split``, ``collapse``, ``fold_cores``), BatchNorm statistics after a
split (``recalibrate_batch_stats``), the orthogonality penalty,
counting and timing (``never_slower``, ``fastest_network``). Any linen
model whose layers are ``nn.Conv`` / ``nn.Dense`` runs a transformed tree
through ``lj.apply(model, variables, x)``; a transformed NNX module is a new
module that runs as it is. On CPU, ``vbmf_ranks`` and the splits run their
LAPACK work with the host BLAS held at one thread (``set_lapack_threads``).
"""

from lowrank_jax import forms
from lowrank_jax.adtn import (adtn_encode, adtn_param_count, adtn_unshare,
                              ADTNLayerAction)
from lowrank_jax.adtn_timing import decode_time, DecodeTime
from lowrank_jax.batch_stats import recalibrate_batch_stats
from lowrank_jax.counting import (count_flops, count_params, FlopsReport,
                                  LayerFlops)
from lowrank_jax.deploy import export
from lowrank_jax.lapack_threads import set_lapack_threads
from lowrank_jax.models import get_model, MODELS
from lowrank_jax.nnx_surgery import FormLayer
from lowrank_jax.penalties import orthogonal_penalty
from lowrank_jax.runner import apply, bind_apply, LayerCall
from lowrank_jax.speed import (fastest_network, LayerTiming, NetworkChoice,
                               NetworkTiming, never_slower, NeverSlowerReport,
                               round_ranks, time_layers, time_networks)
from lowrank_jax.transforms import (collapse, cp_split, decompose,
                                    fold_cores, layer_forms, LayerAction,
                                    overparameterize, svd_split,
                                    tucker2_split)
from lowrank_jax.tree import find_layers, select_paths
from lowrank_jax.vbmf import evbmf, EVBMFResult, vbmf_ranks, weakened_rank

__version__ = '0.1.0'

__all__ = [
    # running any model in any form
    'apply', 'bind_apply', 'FormLayer', 'LayerCall',
    # transforms
    'collapse', 'cp_split', 'decompose', 'fold_cores', 'overparameterize',
    'svd_split',
    'tucker2_split', 'adtn_encode', 'adtn_unshare', 'LayerAction',
    'ADTNLayerAction', 'recalibrate_batch_stats',
    # ranks
    'evbmf', 'EVBMFResult', 'vbmf_ranks', 'weakened_rank', 'round_ranks',
    # trees
    'find_layers', 'layer_forms', 'select_paths', 'forms',
    # penalty, counting, speed
    'orthogonal_penalty', 'count_flops', 'count_params', 'FlopsReport',
    'LayerFlops', 'adtn_param_count', 'decode_time', 'DecodeTime',
    'time_layers', 'LayerTiming', 'never_slower', 'NeverSlowerReport',
    'time_networks', 'NetworkTiming', 'fastest_network', 'NetworkChoice',
    'set_lapack_threads',
    # deployment
    'export',
    # the built-in models
    'get_model', 'MODELS',
]
