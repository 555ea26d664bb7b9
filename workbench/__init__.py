"""Workbench for studying batch noise in normalised convolutional networks (IEBN, DIA-LSTM, CAP)."""

__version__ = "0.1.0"
