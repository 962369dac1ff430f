"""The precision policy: float32 by default, lower precision only where it is native, and
the precision part of every identity."""

import pytest
import torch

from vlbench.errors import UserError
from vlbench.models import precision
from vlbench.run.matrix import MatrixConfig, PluginSpec, make_plan


def test_fp32_is_accepted_everywhere_and_autocast_is_a_no_op():
    assert precision.check_precision("fp32", "cpu") == "fp32"
    with precision.autocast("fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_names_the_choices():
    with pytest.raises(UserError, match="unknown precision 'fp8'.*fp32, bf16, fp16"):
        precision.check_precision("fp8", "cpu")


def test_emulated_bf16_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native", lambda name: False)
    with pytest.raises(UserError) as info:
        precision.check_precision("bf16", "cpu")
    assert "not native on this CPU" in str(info.value) and "--precision fp32" in str(info.value)


def test_a_forced_kernel_family_counts_as_no_native_support(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision.cpu_native("bf16") and not precision.cpu_native("fp16")
    assert precision.cpu_native("fp32")


def test_the_matrix_checks_precision_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_native", lambda name: False)
    cfg = MatrixConfig(defenses=[PluginSpec("none", "none")], attacks=[PluginSpec("none", "none")],
                       datasets=["world-size"], out=str(tmp_path / "out"), precision="bf16")
    with pytest.raises(UserError, match="precision bf16 is not native"):
        make_plan(cfg)
    assert not (tmp_path / "out").exists()


def test_precision_is_part_of_a_cells_identity(tmp_path):
    def cells(value):
        cfg = MatrixConfig(defenses=[PluginSpec("none", "none")], attacks=[PluginSpec("none", "none")],
                           datasets=["world-size"], out=str(tmp_path), precision=value)
        return make_plan(cfg).cells

    fp32 = cells("fp32")[0]
    assert fp32.config["precision"] == "fp32"
    bf16 = cells("bf16")[0] if precision.cpu_native("bf16") else None
    if bf16 is not None:
        assert bf16.id != fp32.id


def test_lower_precision_features_stay_float32(tiny_victim):
    import copy

    victim = copy.deepcopy(tiny_victim)
    victim.precision = "bf16"  # emulated here, and that is fine for a tiny model
    tokens = victim.tokenize(["a red circle."])
    assert victim.encode_image(torch.rand(2, 3, 32, 32)).dtype == torch.float32
    assert victim.encode_text(tokens).dtype == torch.float32
    full = tiny_victim.encode_image(torch.rand(2, 3, 32, 32))
    assert full.dtype == torch.float32


def test_fp16_training_scales_the_loss_and_still_learns(tiny_victim):
    """The CUDA fp16 path (autocast and a gradient scaler) on a CPU, on a tiny model."""
    import copy

    from vlbench.training.loop import Schedule, fit

    victim = copy.deepcopy(tiny_victim)
    victim.precision = "fp16"
    images = torch.rand(8, 3, 32, 32)
    target = torch.nn.functional.normalize(torch.randn(8, victim.encode_image(images[:1]).shape[-1]), dim=-1)

    def loss_at(step):
        return (victim.encode_image(images) - target).pow(2).sum(-1).mean()

    with torch.no_grad():
        before = loss_at(0).item()
    summary = fit(victim.model, victim.model.visual.parameters(), Schedule(steps=30, lr=1e-2),
                           loss_at, progress=False, precision="fp16")
    assert precision.grad_scaler("fp16") is not None and precision.grad_scaler("bf16") is None
    assert summary["last_loss"] < before
