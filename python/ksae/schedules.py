"""Learning-rate schedules: small callables, ``schedule(step) -> lr``.

``step`` counts optimizer updates from 0 (the learning rate of the first update is
``schedule(0)``). Every schedule takes ``base_lr`` and an optional linear warm-up of
``warmup_steps`` updates::

    lr(step) = base_lr * (step + 1) / warmup_steps       for step < warmup_steps
    lr(step) = decay(step - warmup_steps)                 otherwise

so the warm-up reaches ``base_lr`` on its last step and the schedule proper starts from
``base_lr`` at ``t = step - warmup_steps = 0``. ``make_schedule`` builds one by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from .config import SCHEDULE_NAMES as SCHEDULES
from .config import check_choice, check_int, check_positive_float


class Schedule(ABC):
    """Base class: linear warm-up, then ``_decay(t)`` with ``t`` counted from its end."""

    def __init__(self, base_lr: float, *, warmup_steps: int = 0) -> None:
        self.base_lr = check_positive_float("base_lr", base_lr)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)

    def __call__(self, step: int) -> float:
        step = check_int("step", step, 0)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self._decay(step - self.warmup_steps)

    @abstractmethod
    def _decay(self, t: int) -> float:
        """The learning rate ``t`` updates after the warm-up."""

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    """``lr = base_lr`` after the warm-up."""

    def _decay(self, t: int) -> float:
        return self.base_lr


class StepLR(Schedule):
    """``lr = base_lr * gamma ** (t // step_size)`` after the warm-up: multiplied by
    ``gamma`` every ``step_size`` updates."""

    def __init__(self, base_lr: float, step_size: int, gamma: float = 0.1, *,
                 warmup_steps: int = 0) -> None:
        super().__init__(base_lr, warmup_steps=warmup_steps)
        self.step_size = check_int("step_size", step_size, 1)
        self.gamma = check_positive_float("gamma", gamma)

    def _decay(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(Schedule):
    """``lr = base_lr * gamma ** t`` after the warm-up: multiplied by ``gamma`` every
    update."""

    def __init__(self, base_lr: float, gamma: float, *, warmup_steps: int = 0) -> None:
        super().__init__(base_lr, warmup_steps=warmup_steps)
        self.gamma = check_positive_float("gamma", gamma)

    def _decay(self, t: int) -> float:
        return self.base_lr * self.gamma ** t


class CosineLR(Schedule):
    """Cosine annealing from ``base_lr`` to ``min_lr`` over the ``T = total_steps -
    warmup_steps`` updates after the warm-up::

        lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2     for t < T
        lr = min_lr                                                      for t >= T
    """

    def __init__(self, base_lr: float, total_steps: int, min_lr: float = 0.0, *,
                 warmup_steps: int = 0) -> None:
        super().__init__(base_lr, warmup_steps=warmup_steps)
        self.total_steps = check_int("total_steps", total_steps, 1)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps: expected more than warmup_steps = "
                             f"{self.warmup_steps}, got {self.total_steps}")
        self.min_lr = check_positive_float("min_lr", min_lr, allow_zero=True)
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr: expected at most base_lr = {self.base_lr}, got {min_lr!r}")

    def _decay(self, t: int) -> float:
        span = self.total_steps - self.warmup_steps
        if t >= span:
            return self.min_lr
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / span)) / 2


def make_schedule(name: str, base_lr: float, *, total_steps: int, warmup_steps: int = 0,
                  step_size: int | None = None, gamma: float | None = None,
                  min_lr: float = 0.0) -> Schedule:
    """The schedule ``name`` (one of ``SCHEDULES``) starting from ``base_lr``.

    ``total_steps`` is the number of updates of the run; it is checked always and used by
    "cosine". Arguments the named schedule does not use are ignored, so a caller may pass
    every option. "step" needs ``step_size`` (``gamma`` defaults to 0.1); "exponential" needs
    ``gamma``; "cosine" anneals to ``min_lr``.
    """
    check_choice("schedule", name, SCHEDULES)
    total_steps = check_int("total_steps", total_steps, 1)
    if name == "constant":
        return ConstantLR(base_lr, warmup_steps=warmup_steps)
    if name == "step":
        if step_size is None:
            raise ValueError("step_size: required by the 'step' schedule")
        return StepLR(base_lr, step_size, 0.1 if gamma is None else gamma,
                      warmup_steps=warmup_steps)
    if name == "exponential":
        if gamma is None:
            raise ValueError("gamma: required by the 'exponential' schedule")
        return ExponentialLR(base_lr, gamma, warmup_steps=warmup_steps)
    return CosineLR(base_lr, total_steps, min_lr, warmup_steps=warmup_steps)
