"""Online data mixing: EXP3 learns the mixture weights of the data sources from the training loss, as in
Online Data Mixing (Albalak et al. 2023, Algorithm 1; the authors' `Exp3WeightUpdater`).

Each source is an arm. Before training step t (t = 1, 2, ...) the policy is
    eps_t   = min(1/K, sqrt(ln K / (K t))),  eps_0 = 1/K
    pi_t(i) = (1 - K eps_t) exp(eps_{t-1} R_i) / sum_j exp(eps_{t-1} R_j) + eps_t
Each micro-batch of the step comes whole from one arm drawn from pi_t; after the step, every arm i drawn gets
    R_i <- R_i + c L_i / pi_t(i)
where L_i sums the training loss of its micro-batches and c scales loss to reward (the authors divide by 10 so
that the sum does not explode): EXP3's importance-weighted cumulative reward. A source with a high loss has more
left to learn, so its weight grows; eps_t keeps every source's weight at least eps_t. The state is the rewards
and t, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seekstack.tokens.mixture import MixtureSchedule


def exploration_rate(step: int, arms: int) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))), and 1/K at t = 0."""
    return 1 / arms if step == 0 else min(1 / arms, math.sqrt(math.log(arms) / (arms * step)))


class Exp3Mixture:
    """EXP3 weights over data sources, updated from each step's per-source training loss."""

    def __init__(self, sources: list[str], reward_scale: float = 0.1):
        if len(sources) < 2:
            raise ValueError(f"an EXP3 mixture needs at least two sources to choose between, got {sources}")
        if not reward_scale > 0:
            raise ValueError(f"the EXP3 reward scale must be positive, got {reward_scale}")
        self.reward_scale = reward_scale
        self.rewards = dict.fromkeys(sources, 0.0)  # R_i, the cumulative importance-weighted rewards
        self.updates = 0  # steps observed; the next step is t = updates + 1

    @classmethod
    def over(cls, schedule: MixtureSchedule, reward_scale: float = 0.1) -> Exp3Mixture:
        """A bandit over the sources of `schedule`, which must give them all the same single weight (EXP3
        starts from the uniform mix and learns the rest)."""
        weights = {name: ws[0] for name, ws in schedule.weights.items()}
        if schedule.phases > 1 or len(set(weights.values())) > 1:
            raise ValueError(
                f"mixture_mode=bandit learns the weights from the uniform mix; give every source the same single "
                f"weight (e.g. 1), got {schedule.weights}"
            )
        return cls(schedule.sources, reward_scale)

    @property
    def sources(self) -> list[str]:
        return list(self.rewards)

    def weights_at(self, progress: float = 0.0) -> dict[str, float]:
        """pi_t: the probability of each source for the next step (`progress` is unused: the bandit has no
        schedule, only what it observed)."""
        arms, step = len(self.rewards), self.updates + 1
        explore, previous = exploration_rate(step, arms), exploration_rate(step - 1, arms)
        scaled = {name: previous * reward for name, reward in self.rewards.items()}
        top = max(scaled.values())  # subtracted before exp: the softmax is unchanged and cannot overflow
        exps = {name: math.exp(value - top) for name, value in scaled.items()}
        total = sum(exps.values())
        return {name: (1 - arms * explore) * value / total + explore for name, value in exps.items()}

    def update(self, arms: list[str], losses: list[float]) -> None:
        """Observe one step: the arm each micro-batch was drawn from and its training loss."""
        if len(arms) != len(losses):
            raise ValueError(f"{len(arms)} micro-batches were drawn but {len(losses)} losses reported")
        policy = self.weights_at()
        summed: dict[str, float] = {}
        for arm, loss in zip(arms, losses, strict=True):
            summed[arm] = summed.get(arm, 0.0) + loss
        rewards = {arm: self.rewards[arm] + self.reward_scale * loss / policy[arm] for arm, loss in summed.items()}
        for arm, reward in rewards.items():  # past float's range every weight would be NaN, and one source drawn
            if not math.isfinite(reward):
                raise ValueError(
                    f"the EXP3 reward of source {arm!r} overflowed to {reward} (reward scale {self.reward_scale:g} x "
                    f"loss {summed[arm]:g} / probability {policy[arm]:.3g}, added to {self.rewards[arm]:g}): give a "
                    "smaller bandit_reward_scale (0.1 is the authors')"
                )
        self.rewards.update(rewards)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The rewards and the number of steps observed: what the next policy follows from."""
        return {"rewards": dict(self.rewards), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of a bandit over the same sources."""
        if set(state["rewards"]) != set(self.rewards):
            raise ValueError(
                f"the saved EXP3 state covers sources {sorted(state['rewards'])}, this mixture {sorted(self.rewards)}"
            )
        self.rewards = {name: float(state["rewards"][name]) for name in self.rewards}
        self.updates = int(state["updates"])
