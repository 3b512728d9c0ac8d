"""``Block.positive_mask``: where each local row's positive sits in a layout's column block."""

import torch

from amortize.comm import ONE_PROCESS, Block, Gather


def test_positive_mask_of_a_gathered_block_worked_by_hand():
    # rank 1 of 2 with 3 local rows: all 6 columns, its rows' positives are columns 3, 4, 5
    blk = Block(slice(0, 6), torch.zeros(6, 2), offset=3)
    want = torch.tensor([[0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(blk.positive_mask(3), want)


def test_positive_mask_of_a_block_without_positives_is_empty():
    # a ring block from another process: offset B puts every positive out of range
    assert not Block(slice(3, 6), torch.zeros(3, 2), offset=3).positive_mask(3).any()


def test_the_one_process_block_has_its_positives_on_the_diagonal():
    (blk,) = Gather(ONE_PROCESS).columns(torch.zeros(4, 2))
    assert torch.equal(blk.positive_mask(4), torch.eye(4, dtype=torch.bool))
