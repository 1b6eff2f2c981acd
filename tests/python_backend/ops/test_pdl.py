"""ops/pdl.py: programmatic dependent launch stays off unless asked for and possible."""

from __future__ import annotations

import torch

from python_backend.ops import pdl


def test_off_on_a_cpu_even_when_asked_for(monkeypatch):
    monkeypatch.setenv("FASTSERVE_PDL", "1")
    assert not pdl.enabled(torch.device("cpu"))


def test_no_launch_option_without_pdl():
    # Triton releases before the option reject it as an unknown kernel argument, so none is passed
    assert pdl.launch(False) == {}
    assert pdl.launch(True) == {"launch_pdl": True}
