"""Layers: IEBN2d (and its synced variant), SE, DIA-LSTM; converters; attention probe points."""

from workbench.nn.convert import convert_bn_to_iebn, convert_sync_batchnorm
from workbench.nn.dia import DIALSTMCell, dia_lstm_gates
from workbench.nn.functional import iebn_reference
from workbench.nn.iebn import IEBN2d
from workbench.nn.probe import ATTENTION_KINDS, AttentionProbe, attention_probes
from workbench.nn.se import SEModule
from workbench.nn.sync import SyncBatchNorm2d, SyncIEBN2d

__all__ = [
    "ATTENTION_KINDS",
    "AttentionProbe",
    "DIALSTMCell",
    "IEBN2d",
    "SEModule",
    "SyncBatchNorm2d",
    "SyncIEBN2d",
    "attention_probes",
    "convert_bn_to_iebn",
    "convert_sync_batchnorm",
    "dia_lstm_gates",
    "iebn_reference",
]
