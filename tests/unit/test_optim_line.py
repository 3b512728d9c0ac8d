"""The optimiser line printed at start and by --dry-run names the recipe's lr, not the warm-up's first value."""

import torch

from amortize.train.optim import describe_optimizer


def test_the_printed_lr_is_the_recipes_during_a_warm_up():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2e-3, betas=(0.9, 0.98))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # a warm-up: the group's lr is 0 at step 0
    assert opt.param_groups[0]["lr"] == 0
    line = describe_optimizer(opt, batch_size=256)
    assert line.startswith("AdamW (lr 0.002, betas 0.9 / 0.98: beta2's half-life")
    assert describe_optimizer(torch.optim.SGD([p], lr=0.1)) == "SGD (lr 0.1)"
