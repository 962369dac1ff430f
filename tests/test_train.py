"""The shared trainer: exact resume, checkpoints, NaN stop, frozen parameters stay frozen."""

import pytest
import torch
from torch import nn

from vlbench.training.loop import Schedule, TrainingDiverged, fit, latest_checkpoint


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_loss(model, generator, fail_at=None, nan_at=None):
    def loss_at(step):
        if step == fail_at:
            raise KeyboardInterrupt  # as if the process were stopped here
        x = torch.randn(16, 4, generator=generator)
        loss = ((model(x).squeeze(1) - x.sum(dim=1)) ** 2).mean()
        return loss * float("nan") if step == nan_at else loss

    return loss_at


SCHEDULE = Schedule(steps=12, lr=1e-2, weight_decay=1e-4, warmup=3)


def train(folder, fail_at=None, nan_at=None, every=4):
    model = make_model()
    generator = torch.Generator().manual_seed(1)
    summary = fit(model, model.parameters(), SCHEDULE, make_loss(model, generator, fail_at, nan_at),
                           progress=False, generators={"data": generator}, checkpoint_dir=folder,
                           checkpoint_every=every)
    return model, summary


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    reference, _ = train(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "interrupted", fail_at=9)
    step, _ = latest_checkpoint(tmp_path / "interrupted")
    assert step == 7
    resumed, summary = train(tmp_path / "interrupted")
    assert summary["resumed_from"].endswith("step-7.safetensors")
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_only_the_newest_checkpoint_is_kept_and_final_is_written(tmp_path):
    train(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-11.safetensors"]


def test_nan_loss_names_step_and_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step 6 \(last good checkpoint: .*step-5.safetensors\)"):
        train(tmp_path, nan_at=6, every=2)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(tmp_path / "none", nan_at=0)


def test_damaged_checkpoint_is_not_resumed(tmp_path):
    (tmp_path / "step-5.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) is None


def test_frozen_parameters_get_no_gradient_and_do_not_change(tmp_path):
    model = make_model()
    frozen = {k: v.clone() for k, v in model[2].state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    fit(model, model[0].parameters(), SCHEDULE, make_loss(model, generator), progress=False)
    assert all(torch.equal(frozen[k], v) for k, v in model[2].state_dict().items())
    assert all(p.grad is None for p in model[2].parameters())
    assert any(p.grad is not None for p in model[0].parameters())


def test_world_pretraining_runs_in_the_one_training_loop():
    """pretrain() (the shared loop, with the recipe's optimizer, per-group learning rates
    and temperature cap) gives exactly the weights of stepping the recipe by hand."""
    from vlbench.world.pretrain import PretrainConfig, Pretraining, pretrain

    config = PretrainConfig(steps=6, n_train=128, batch_size=16, warmup=2, text_frozen_steps=3)
    looped = pretrain(config, progress=False)
    by_hand = Pretraining(config)
    for step in range(config.steps):
        by_hand.step(step)
    state = by_hand.victim.model.state_dict()
    assert looped.keys() == state.keys() and all(torch.equal(looped[k], state[k]) for k in state)


def test_the_loop_takes_a_recipes_optimizer_learning_rates_and_step_hook():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.randn(8, 3)
    optimizer = torch.optim.SGD([{"params": [model.weight], "slow": False}, {"params": [model.bias], "slow": True}],
                                lr=1.0)
    seen = []
    fit(model, model.parameters(), Schedule(steps=3, lr=0.1), lambda step: model(data).pow(2).mean(),
                 progress=False, optimizer=optimizer, lr_at=lambda step, group: 0.01 if group["slow"] else 0.1,
                 after_step=lambda step: seen.append((step, [g["lr"] for g in optimizer.param_groups])))
    assert seen == [(0, [0.1, 0.01]), (1, [0.1, 0.01]), (2, [0.1, 0.01])]
