"""EMA teacher: decay schedule vs the linear formula, and the update vs tau*t + (1-tau)*s computed here."""

import pytest
import torch
from torch import nn

from model.teacher import EMATeacher, ema_decay


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.999), (15_000, 0.999 + 0.5 * (0.9999 - 0.999)), (7_500, 0.999 + 0.25 * (0.9999 - 0.999)),
     (30_000, 0.9999), (100_000, 0.9999)],
)
def test_ema_decay_linear_then_constant(step, expected):
    assert ema_decay(step, 0.999, 0.9999, 30_000) == pytest.approx(expected, abs=1e-12)


def test_ema_decay_constant_when_no_annealing():
    assert ema_decay(0, 0.9998, 0.9998, 0) == 0.9998
    assert ema_decay(123, 0.999, 0.9998, 0) == 0.9998  # tau_steps == 0 means constant tau_end
    with pytest.raises(ValueError):
        ema_decay(-1, 0.999, 0.9999, 10)


class Tiny(nn.Module):
    """frontend (copied) -> norm with buffers (copied) -> blocks (averaged), with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        return self.blocks(self.bn(self.frontend(x)))


def averaged(name: str) -> bool:
    return name.startswith("blocks.")


def perturb(model: nn.Module, seed: int) -> None:
    """Move the student's parameters and buffers, as a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        model(torch.randn(16, 4, generator=g).to(next(model.parameters()).dtype))  # updates BN stats in train


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_teacher_is_frozen_fp32_eval_copy():
    student = Tiny().train()
    teacher = EMATeacher(student, averaged)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.model.parameters())
    assert teacher.model is not student and not teacher.model.training
    student.train()
    assert not teacher.model.training
    teacher.model.train()  # even if someone flips it, the accessor re-asserts eval
    assert not any(m.training for m in teacher.model.modules())
    # eval => dropout off => deterministic; no graph is built through the teacher
    x = torch.randn(5, 4)
    y1, y2 = teacher.model(x), teacher.model(x)
    assert torch.equal(y1, y2) and not y1.requires_grad
    # independent storage: changing the student does not change the teacher before update
    before = snapshot(teacher.model)
    perturb(student, 0)
    assert all(torch.equal(before[k], v) for k, v in snapshot(teacher.model).items())
    assert teacher.averaged_names == ["blocks.0.weight", "blocks.0.bias", "blocks.3.weight", "blocks.3.bias"]


def test_update_averages_and_copies():
    student = Tiny().train()
    teacher = EMATeacher(student, averaged)
    for step, tau in enumerate([0.9, 0.99, 0.5]):
        perturb(student, step)
        t_old, s_new = snapshot(teacher.model), snapshot(student)
        teacher.update(student, tau)
        t_new = snapshot(teacher.model)
        for k in t_new:
            if k.startswith("blocks."):
                expected = tau * t_old[k] + (1 - tau) * s_new[k]
                torch.testing.assert_close(t_new[k], expected, rtol=0, atol=1e-6)
                assert not torch.allclose(t_new[k], s_new[k])
            else:  # frontend params and BN running stats are shared: exact copies
                assert torch.equal(t_new[k], s_new[k]), k
    assert int(teacher.model.bn.num_batches_tracked) == int(student.bn.num_batches_tracked) == 3


def test_update_with_bf16_student_stays_fp32():
    student = Tiny().train()
    teacher = EMATeacher(student, averaged)
    student = student.to(torch.bfloat16)
    perturb(student, 1)
    t_old, s_new = snapshot(teacher.model), snapshot(student)
    teacher.update(student, 0.75)
    for k, v in teacher.model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
    w = teacher.model.blocks[0].weight.double()
    torch.testing.assert_close(w, 0.75 * t_old["blocks.0.weight"] + 0.25 * s_new["blocks.0.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.model.frontend.weight.double(), s_new["frontend.weight"], rtol=0, atol=0)


def test_frozen_student_params_are_copied_not_averaged():
    student = Tiny()
    student.blocks[3].bias.requires_grad_(False)
    teacher = EMATeacher(student, averaged)
    assert "blocks.3.bias" in teacher.copied_names
    perturb(student, 2)
    teacher.update(student, 0.9)
    assert torch.equal(teacher.model.blocks[3].bias, student.blocks[3].bias)


def test_update_rejects_other_architecture_and_bad_decay():
    teacher = EMATeacher(Tiny(), averaged)
    with pytest.raises(KeyError):
        teacher.update(nn.Sequential(nn.Linear(4, 8)), 0.9)
    with pytest.raises(ValueError):
        teacher.update(Tiny(), 1.5)


def test_state_dict_roundtrip():
    student = Tiny()
    a = EMATeacher(student, averaged)
    perturb(student, 3)
    a.update(student, 0.5)
    b = EMATeacher(Tiny(), averaged)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
