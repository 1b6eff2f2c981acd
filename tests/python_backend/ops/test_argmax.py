"""The two-pass GPU argmax against torch.argmax, ties included (interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.ops.argmax import CHUNK, argmax_rows  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, CHUNK), (2, 3 * CHUNK + 17), (5, 49152)])
def test_argmax_rows_matches_torch(rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(DEV)
    assert argmax_rows(logits).tolist() == logits.argmax(-1).tolist()


def test_ties_go_to_the_first_index_across_chunks():
    vocab = 3 * CHUNK + 5
    logits = torch.zeros(3, vocab, device=DEV)
    logits[0, [CHUNK + 3, 2 * CHUNK + 1, 7]] = 4.0  # the tie spans chunks; the lowest index wins
    logits[1, [vocab - 1, CHUNK]] = 2.5
    logits[2, :] = -float("inf")
    logits[2, [9, 8]] = -1.0
    assert argmax_rows(logits).tolist() == [7, CHUNK, 8] == logits.argmax(-1).tolist()


def test_a_view_with_row_stride_and_bfloat16_logits():
    base = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)).to(DEV)
    view = base[::2, :250]
    assert argmax_rows(view).tolist() == view.argmax(-1).tolist()
    half = base.to(torch.float16 if DEV.type == "cpu" else torch.bfloat16)
    assert argmax_rows(half).tolist() == half.float().argmax(-1).tolist()
