"""Layers: IEBN2d (and its synced variant), SE, DIA-LSTM; converters; attention probe points; the norm
toolkit (``create_norm``, ``norm_layers`` and its predicates)."""

from workbench.nn.convert import convert_bn_to_iebn, convert_sync_batchnorm
from workbench.nn.dia import DIALSTMCell, dia_lstm_gates
from workbench.nn.functional import iebn_reference
from workbench.nn.iebn import IEBN2d
from workbench.nn.norms import NORM_KINDS, create_norm, get_norm_layer, is_affine_norm, is_iebn, is_norm, norm_layers
from workbench.nn.probe import ATTENTION_KINDS, AttentionProbe, attention_probes
from workbench.nn.se import SEModule
from workbench.nn.sync import SyncBatchNorm2d, SyncIEBN2d

__all__ = [
    "ATTENTION_KINDS",
    "AttentionProbe",
    "DIALSTMCell",
    "IEBN2d",
    "NORM_KINDS",
    "SEModule",
    "SyncBatchNorm2d",
    "SyncIEBN2d",
    "attention_probes",
    "convert_bn_to_iebn",
    "convert_sync_batchnorm",
    "create_norm",
    "dia_lstm_gates",
    "get_norm_layer",
    "iebn_reference",
    "is_affine_norm",
    "is_iebn",
    "is_norm",
    "norm_layers",
]
