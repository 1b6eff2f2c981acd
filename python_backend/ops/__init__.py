"""Attention and other ops: PyTorch references and GPU kernels."""
