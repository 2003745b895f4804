"""EMA teacher: the decay schedule (a pure function of the step) and the fp32 exponential moving average.

teacher <- tau * teacher + (1 - tau) * student for the averaged parameters; the rest of the teacher
(the parameters data2vec shares instead of averaging, e.g. the audio conv front end and positional conv,
and all buffers) is copied from the student on every update, which is what the reference code's EMA
"skip keys" do. The stepping is driven by the training loop, never by the model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import nn


def ema_decay(step: int, tau0: float, tau_end: float, tau_steps: int) -> float:
    """EMA decay at update `step`: linear from tau0 (step 0) to tau_end (step tau_steps), then tau_end.

    Same as fairseq data2vec `set_num_updates` + `get_annealed_rate`:
    tau = tau_end - (tau_end - tau0) * (1 - step / tau_steps) while step < tau_steps.
    tau_steps == 0 means no annealing: the decay is tau_end from the start (presets with a constant
    decay set tau0 == tau_end, tau_steps = 0).
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if tau_steps <= 0 or step >= tau_steps:
        return tau_end
    return tau_end - (tau_end - tau0) * (1.0 - step / tau_steps)


class EMATeacher:
    """An fp32, gradient-free, eval-mode copy of the student, updated by EMA.

    averaged(name) decides per parameter name (as in `student.named_parameters()`) whether the parameter
    is EMA-averaged; parameters for which it is False, parameters that the student freezes
    (requires_grad False, as fairseq's EMAModule does) and all buffers are copied from the student at
    every `update`. Parameters are matched by name, so `update` accepts any module of the same
    architecture (e.g. the student unwrapped from DDP / compile by the caller).

    Use `teacher.model` for the forward pass; it is always returned in eval mode.
    """

    def __init__(self, student: nn.Module, averaged: Callable[[str], bool]) -> None:
        model = copy.deepcopy(student).float()
        for p in model.parameters():
            p.grad = None
        self._model = model.requires_grad_(False).eval()
        self.averaged_names: list[str] = []
        self.copied_names: list[str] = []
        for name, p in student.named_parameters():
            (self.averaged_names if averaged(name) and p.requires_grad else self.copied_names).append(name)

    @property
    def model(self) -> nn.Module:
        """The teacher module, re-asserted to eval mode (no dropout / layerdrop / drop path)."""
        return self._model.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student (averaged params, in fp32); copy the rest."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1]")
        t_params = dict(self._model.named_parameters())
        t_buffers = dict(self._model.named_buffers())
        s_params = dict(student.named_parameters())
        s_buffers = dict(student.named_buffers())
        missing = [n for n in t_params if n not in s_params] + [n for n in t_buffers if n not in s_buffers]
        if missing:
            raise KeyError(f"student lacks {missing[:5]}; is it the teacher's architecture (unwrapped)?")
        avg = [t_params[n] for n in self.averaged_names]
        copied = [t_params[n] for n in self.copied_names] + list(t_buffers.values())
        if avg:
            src = [s_params[n].detach().float() for n in self.averaged_names]  # fp32 copies if bf16
            # lerp_(t, s, w) = t + w * (s - t) = (1 - w) * t + w * s, with w = 1 - decay
            torch._foreach_lerp_(avg, src, 1.0 - decay)
        if copied:
            src = [s_params[n].detach() for n in self.copied_names] + [s_buffers[n] for n in t_buffers]
            torch._foreach_copy_(copied, src)  # casts to the teacher's dtype (fp32)

    def state_dict(self) -> dict[str, Any]:
        """The teacher module's state dict (fp32)."""
        return self._model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state dict saved by `state_dict` (copied into the fp32 teacher in place)."""
        self._model.load_state_dict(state)
