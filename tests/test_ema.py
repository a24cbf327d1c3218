"""``WeightEMA`` (``train.ema_decay``) against the EMA recurrence written out by hand."""
from __future__ import annotations

import pytest
import torch

from zoome_dist.train.ema import WeightEMA


def test_ema_follows_the_warmed_up_recurrence_and_gives_the_weights_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema = WeightEMA(model, decay=0.9)
    by_hand = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(90):  # the decay reaches 0.9 at update 81
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(5, 3, dtype=torch.bfloat16))  # BatchNorm statistics and its step count move
        d = min(0.9, (1 + n) / (10 + n))  # warm-up: 0.1, 0.18, ... then 0.9
        for k, v in model.state_dict().items():
            if k in by_hand:
                by_hand[k] = d * by_hand[k] + (1 - d) * v.double()
        ema.update(model)
    assert ema.updates == 90 and ema.step_decay() == 0.9
    for k, v in by_hand.items():
        assert ema.shadow[k].dtype == torch.float32  # the average is kept in fp32 under bf16 weights
        torch.testing.assert_close(ema.shadow[k].double(), v, rtol=1e-5, atol=1e-6)
    assert int(ema.shadow["1.num_batches_tracked"]) == 90  # integer buffers are copied, not averaged

    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        inside = model.state_dict()
        assert torch.equal(inside["0.weight"], ema.shadow["0.weight"].to(torch.bfloat16))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())

    again = WeightEMA(model, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 90 and all(torch.equal(again.shadow[k], v) for k, v in ema.shadow.items())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="train.ema_decay"):
        WeightEMA(torch.nn.Linear(2, 2), decay)
