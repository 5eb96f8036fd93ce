"""Is the trajectory-matching half of D3 working? Watched while distilling (docs/algorithm.md
section 5, "The learned student lr").

Two ways the MTT term goes idle, both seen on real runs:

  lr at its floor   the learned student lr at its lowest value: 1e-4 once alpha < 0 under the
                    reference's leaky_relu(alpha) + 1e-4 (the digits preset reached it at step 4
                    and stayed ~80 steps), or, under lr_param "log", below 1 % of lr_teacher.
                    A student that barely moves cannot match a trajectory: the MTT loss sits at
                    1.0 and its gradient, scaled by the lr, is ~0.
  MTT stalled       the median MTT loss over the last `distill.health_steps` steps within
                    STALL_BAND (0.05) of 1.0: the students end as far from the target as they
                    started (the Fashion-MNIST preset of 2026-12 sat at 0.90-1.03 for 300
                    steps), so the gains come from the MMD term alone. The median, not the
                    mean: a random decoder's first steps give losses of 1.3-2.8 that averaged
                    with healthy 0.5-0.6 ones to 0.966 over steps 3-22 of the digits preset,
                    whose median there is 0.79 and which stays below 0.8 from then on.

After `distill.health_steps` steps (0 disables the watch) in either state, `distill` warns once,
with the fix, and warns again only after the run has recovered and fallen back. Every metrics
line carries `mtt_health` ("ok", or what is wrong since which step); `d3fast runs` shows the
last one. The watch is part of the checkpoint (`state_dict`), so a resumed run warns as the
uninterrupted one does.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from d3fast.distilled import LEAKY_LR_FLOOR

# |median MTT loss - 1| below this over the window: stalled. Healthy runs here sit at 0.36-0.87
# (digits preset, lr_param log), stalled ones at 0.98-1.0 (digits, leaky_relu at its floor)
STALL_BAND = 0.05
# leaky_relu(alpha) + 1e-4 is 1e-4 at alpha = 0 and below it (1e-4 + 0.01 alpha)
LEAKY_FLOOR = LEAKY_LR_FLOOR
# lr_param log has no floor: an lr below this fraction of lr_teacher counts as one
LOG_FLOOR_FRACTION = 0.01


class MTTHealth:
    """The watch of one run. `update` after every step; `state_dict` for the checkpoint.

    Args:
        steps: the window N (distill.health_steps); 0 watches nothing.
        lr_param: "log" or "leaky_relu" (distill.lr_param).
        lr_teacher: the lr the learned one started at (distill.lr_teacher).
        mtt_on: whether the run has an MTT term (distill.mtt_weight > 0).
    """

    def __init__(self, steps: int, lr_param: str, lr_teacher: float, mtt_on: bool = True) -> None:
        self.steps, self.mtt_on = steps, mtt_on and steps > 0
        self.floor = LEAKY_FLOOR * (1 + 1e-3) if lr_param == "leaky_relu" else lr_teacher * LOG_FLOOR_FRACTION
        self.lr_param = lr_param
        self.recent: deque[float] = deque(maxlen=max(steps, 1))
        self.floor_since: int | None = None  # first step of the current run of steps at the floor
        self.stall_since: int | None = None
        self.warned: set[str] = set()

    def update(self, step: int, mtt: float, lr: float) -> tuple[str, str | None]:
        """Take step `step`'s MTT loss (the mean over its students) and student lr. Returns
        (the step's `mtt_health`, a warning to print now or None)."""
        if not self.mtt_on:  # nothing carried over a stretch without the watch
            self.recent.clear()
            self.floor_since = self.stall_since = None
            self.warned.clear()
            return "off", None
        self.recent.append(mtt)
        self.floor_since = (self.floor_since or step) if lr <= self.floor else None
        full = len(self.recent) == self.steps
        stalled = full and abs(statistics.median(self.recent) - 1.0) < STALL_BAND
        self.stall_since = (self.stall_since or step - self.steps + 1) if stalled else None
        problems = {}
        if self.floor_since is not None and step - self.floor_since + 1 >= self.steps:
            problems["lr_floor"] = f"lr at floor since step {self.floor_since}"
        if self.stall_since is not None:
            problems["stalled"] = f"MTT stalled since step {self.stall_since}"
        self.warned &= set(problems)  # a recovered problem may warn again
        new = [k for k in problems if k not in self.warned]  # the lr first: a stall follows from it
        self.warned |= set(new)
        warning = "\n".join(self._warning(k, step, mtt, lr) for k in new) if new else None
        return ("; ".join(problems.values()) or "ok"), warning

    def _warning(self, kind: str, step: int, mtt: float, lr: float) -> str:
        n = self.steps
        if kind == "lr_floor":
            if self.lr_param == "leaky_relu":
                fix = ("the reference's leaky_relu parametrisation cannot leave it quickly (its gradient is scaled "
                       "by 0.01 below zero): start a new run with distill.lr_param=log (the default), or lower "
                       "distill.lr_lr")
                where = f"at its floor ({self.floor:.3g})"
            else:
                fix = ("start again, or resume from a checkpoint before the fall, with a lower distill.lr_lr "
                       "(--set distill.lr_lr=...)")
                where = f"below 1 % of distill.lr_teacher ({self.floor:.3g})"
            return (f"warning: step {step}: the learned student lr ({lr:.3g}) has sat {where} for {n} steps, so the "
                    f"MTT term is idle (loss {mtt:.3f}); {fix}")
        median = statistics.median(self.recent)
        return (f"warning: step {step}: the MTT loss's median over the last {n} steps is {median:.3f} (within "
                f"{STALL_BAND} of 1.0): the unrolled students end as far from the expert's target as they start, "
                f"so the gains come from the MMD term alone (student lr {lr:.3g}). Try a larger distill.lr_teacher "
                "or distill.syn_steps, or a smaller distill.expert_epochs (on a large train set one epoch is "
                "hundreds of expert steps; a fraction of one needs experts.snapshots_per_epoch > 1, "
                "docs/algorithm.md section 4)")

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "floor_since": self.floor_since, "stall_since": self.stall_since,
                "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(v) for v in state.get("recent", [])), maxlen=max(self.steps, 1))
        self.floor_since, self.stall_since = state.get("floor_since"), state.get("stall_since")
        self.warned = set(state.get("warned", []))


__all__ = ["LEAKY_FLOOR", "LOG_FLOOR_FRACTION", "STALL_BAND", "MTTHealth"]
