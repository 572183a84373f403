"""Every scheduler type the CLI accepts builds and steps; bad combinations are one-line user errors."""

import typing
from types import SimpleNamespace

import pytest

import main
from errors import UserError
from module import LitClassifier, check_scheduler
from tiny import tiny_arch

TINY = tiny_arch(hidden_size=12, num_hidden_layers=3, intermediate_size=24).to_dict()
NEEDS_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 1e-5},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-5},
    "warmup_stable_decay": {"num_decay_steps": 5},
}


@pytest.mark.parametrize("name", typing.get_args(main.Scheduler))
def test_every_scheduler_builds_and_steps(name):
    module = LitClassifier(model_type="vit", arch=TINY, num_labels=3, scheduler_type=name, num_warmup_steps=2,
                           scheduler_specific_kwargs=NEEDS_KWARGS.get(name, {}))
    module._trainer = SimpleNamespace(estimated_stepping_batches=20)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[2] or name in ("constant",)  # every warmup schedule ramps up from below the peak
    assert max(lrs) <= 1e-3 + 1e-12 and all(lr >= 0 for lr in lrs)


def test_constant_with_warmup_reaches_peak_after_warmup():
    module = LitClassifier(
        model_type="vit", arch=TINY, num_labels=3, scheduler_type="constant_with_warmup", num_warmup_steps=4
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_cosine_with_min_lr_without_min_lr_is_a_user_error():
    with pytest.raises(UserError, match="cosine_with_min_lr"):
        check_scheduler("cosine_with_min_lr", 0, {})
    with pytest.raises(UserError, match="--num_warmup_steps"):
        check_scheduler("constant", -1, {})
