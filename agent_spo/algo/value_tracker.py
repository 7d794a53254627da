"""Per-prompt value tracker: a discounted Beta posterior over each prompt's success rate.

Spec §1 (paper Eq. 5-7, App. A/D). State per prompt x: ``alpha(x)``, ``beta(x)``;

    v_hat(x) = alpha / (alpha + beta)          n_eff(x) = alpha + beta

After a reward r in [0, 1] for x, with discount rho(x):

    alpha <- rho * alpha + r                   beta <- rho * beta + (1 - r)

which is exactly the EMA form ``v_hat <- v_hat + eta * (r - v_hat)`` with
``eta = 1 / (rho * n_eff + 1)`` (n_eff before the update), so binary and fractional
rewards share one update. With a constant rho, n_eff converges to ``1 / (1 - rho)``.

The discount comes from how far the policy drifted since x was last visited:

    rho(x) = clip(2 ** (-D(x) / D_half), rho_min, rho_max)

Three ways to get D (``rho_mode``):

* ``kl_version`` (streaming default): the learner reports one drift number ``d_s`` per
  update step (:meth:`ValueTracker.record_step_drift`); D(x) is the sum of ``d_s`` over
  the steps since x's last visit. An offline initialisation counts as a visit by the
  initial policy, so the first online visit of such a prompt is discounted by all the
  drift since training began; a prompt with neither gets D = 0. Order matters: record
  a step's drift *before* observing that step's rewards, so D is measured up to the
  policy right after the update (the reference recipe's choice).
* ``kl_exact`` (the reference recipe): the caller measures D(x) itself (mean absolute
  token log-ratio on x's previous trajectory) and passes it in. First visit: D = 0.
* ``constant``: rho is ``rho_constant`` for every update (ablation).

Pure code: numbers in, numbers out; no I/O, no config objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

RhoMode = Literal["kl_version", "kl_exact", "constant"]
InitForm = Literal["paper", "smoothed"]

_STATE_VERSION = 1


def rho_from_drift(drift: float, *, d_half: float, rho_min: float, rho_max: float) -> float:
    """rho = clip(2^(-D / D_half), rho_min, rho_max)  (spec §1, paper §4.1)."""
    drift = _finite_drift(drift)
    return min(max(2.0 ** (-drift / d_half), rho_min), rho_max)


def prior_from_scores(
    n_correct: float, n_samples: int, *, prior_strength: float, form: InitForm
) -> tuple[float, float]:
    """Offline initialisation (alpha0, beta0) from n_correct successes in n_samples.

    paper:    v0 = s / n0                     (spec §1, paper Eq. 6)
    smoothed: v0 = (s + 0.5) / (n0 + 1)       (reference recipe; v0 never 0 or 1)
    alpha0 = N0 * v0,  beta0 = N0 * (1 - v0),  N0 = prior_strength = 1 / (1 - rho_min).
    """
    if n_samples <= 0:
        raise ValueError(f"offline initialisation needs n_samples > 0, got {n_samples}")
    if not 0.0 <= n_correct <= n_samples:
        raise ValueError(f"n_correct must lie in [0, {n_samples}], got {n_correct}")
    if form == "paper":
        v0 = n_correct / n_samples
    elif form == "smoothed":
        v0 = (n_correct + 0.5) / (n_samples + 1)
    else:
        raise ValueError(f"unknown init form {form!r}; allowed: 'paper', 'smoothed'")
    return prior_strength * v0, prior_strength * (1.0 - v0)


@dataclass(frozen=True)
class TrackerUpdate:
    """What one tracker update did: the pre-update baseline and the discount used."""

    pid: str
    v_hat_before: float
    v_hat_after: float
    n_eff_before: float
    rho: float
    drift: float
    first_visit: bool


class ValueTracker:
    """Discounted Beta value tracker keyed by a stable prompt id (spec §1)."""

    def __init__(
        self,
        *,
        rho_mode: RhoMode = "kl_version",
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        d_half: float = 0.06,
        rho_constant: float = 0.875,
        prior_alpha: float = 0.5,
        prior_beta: float = 0.5,
    ) -> None:
        if rho_mode not in ("kl_version", "kl_exact", "constant"):
            raise ValueError(
                f"unknown rho_mode {rho_mode!r}; allowed: 'kl_version', 'kl_exact', 'constant'"
            )
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {rho_min}, {rho_max}")
        if not 0.0 < rho_constant <= 1.0:
            raise ValueError(f"rho_constant must lie in (0, 1], got {rho_constant}")
        if not (d_half > 0.0 and math.isfinite(d_half)):
            raise ValueError(f"d_half must be a finite number > 0, got {d_half}")
        if prior_alpha < 0.0 or prior_beta < 0.0 or prior_alpha + prior_beta <= 0.0:
            raise ValueError("prior alpha, beta must be >= 0 with a positive sum")
        self.rho_mode: RhoMode = rho_mode
        self.rho_min = rho_min
        self.rho_max = rho_max
        self.d_half = d_half
        self.rho_constant = rho_constant
        # Prompts never initialised start here; (0.5, 0.5) is the "no offline init" ablation.
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self._alpha: dict[str, float] = {}
        self._beta: dict[str, float] = {}
        self._visits: dict[str, int] = {}
        # kl_version bookkeeping: total drift so far, and its value at each prompt's last visit.
        self._cum_drift = 0.0
        self._steps = 0
        self._drift_at_visit: dict[str, float] = {}

    # ----------------------------------------------------------------- initialisation
    @property
    def prior_strength(self) -> float:
        """N0 = 1 / (1 - rho_min): the equilibrium n_eff at the strongest discount."""
        return 1.0 / (1.0 - self.rho_min) if self.rho_min < 1.0 else math.inf

    def init_from_scores(
        self, scores: Mapping[str, Sequence[float]], form: InitForm = "paper"
    ) -> None:
        """Set each prompt's prior from offline rewards of the initial policy (spec §1).

        The estimate counts as a visit by the current policy: any earlier visit history of
        the prompt is forgotten, and kl_version measures its drift from here.
        """
        strength = self.prior_strength
        if not math.isfinite(strength):
            raise ValueError("offline initialisation needs rho_min < 1")
        for pid, rewards in scores.items():
            rewards = [_check_reward(r) for r in rewards]
            a, b = prior_from_scores(sum(rewards), len(rewards), prior_strength=strength, form=form)
            self._alpha[pid], self._beta[pid] = a, b
            self._visits.pop(pid, None)
            self._drift_at_visit[pid] = self._cum_drift

    # ----------------------------------------------------------------------- queries
    def __contains__(self, pid: str) -> bool:
        return pid in self._alpha

    def __len__(self) -> int:
        return len(self._alpha)

    def alpha_beta(self, pid: str) -> tuple[float, float]:
        """(alpha, beta) of a prompt; the prior for a prompt never seen."""
        return self._alpha.get(pid, self.prior_alpha), self._beta.get(pid, self.prior_beta)

    def value(self, pid: str) -> float:
        """v_hat(x) = alpha / (alpha + beta)."""
        a, b = self.alpha_beta(pid)
        return a / (a + b)

    def n_eff(self, pid: str) -> float:
        """n_eff(x) = alpha + beta."""
        a, b = self.alpha_beta(pid)
        return a + b

    def values(self, pids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(v_hat, n_eff) arrays for many prompts, in order."""
        ab = np.array([self.alpha_beta(p) for p in pids], dtype=np.float64).reshape(-1, 2)
        n = ab[:, 0] + ab[:, 1]
        return ab[:, 0] / n, n

    def visits(self, pid: str) -> int:
        return self._visits.get(pid, 0)

    @property
    def steps(self) -> int:
        """Number of learner steps recorded with :meth:`record_step_drift`."""
        return self._steps

    @property
    def cumulative_drift(self) -> float:
        return self._cum_drift

    # ------------------------------------------------------------------------ discount
    def record_step_drift(self, drift: float) -> None:
        """kl_version: the learner's drift d_s of one update step (mean |logp_after - logp_before|)."""
        self._cum_drift += _finite_drift(drift)
        self._steps += 1

    def drift_since_visit(self, pid: str) -> float:
        """kl_version: D(x) = sum of d_s since x's last visit or offline init (else 0)."""
        last = self._drift_at_visit.get(pid)
        return 0.0 if last is None else self._cum_drift - last

    def rho(self, pid: str, drift: float | None = None) -> tuple[float, float]:
        """(rho, D) for the next update of ``pid`` under this tracker's rho mode.

        ``drift`` is required in ``kl_exact`` mode for a prompt visited before and must be
        omitted otherwise (a first visit has no previous trajectory: D = 0).
        """
        if self.rho_mode == "constant":
            if drift is not None:
                raise ValueError("rho_mode 'constant' takes no drift")
            return self.rho_constant, 0.0
        if self.rho_mode == "kl_version":
            if drift is not None:
                raise ValueError("rho_mode 'kl_version' computes the drift itself; pass none")
            d = self.drift_since_visit(pid)
        else:  # kl_exact
            if self.visits(pid) == 0:
                if drift is not None:
                    raise ValueError(
                        f"{pid!r} has no previous visit, so no drift can have been measured;"
                        " pass drift=None (D = 0)"
                    )
                d = 0.0
            elif drift is None:
                raise ValueError(f"rho_mode 'kl_exact' needs the measured drift D for {pid!r}")
            else:
                d = _finite_drift(drift)
        rho = rho_from_drift(d, d_half=self.d_half, rho_min=self.rho_min, rho_max=self.rho_max)
        return rho, d

    # -------------------------------------------------------------------------- update
    def update(self, pid: str, reward: float, rho: float) -> None:
        """alpha <- rho*alpha + r,  beta <- rho*beta + (1 - r)   (paper Eq. 5)."""
        reward = _check_reward(reward)
        rho = float(rho)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must lie in (0, 1], got {rho!r}")
        a, b = self.alpha_beta(pid)
        self._alpha[pid] = rho * a + reward
        self._beta[pid] = rho * b + (1.0 - reward)
        self._visits[pid] = self._visits.get(pid, 0) + 1
        self._drift_at_visit[pid] = self._cum_drift

    def observe(self, pid: str, reward: float, drift: float | None = None) -> TrackerUpdate:
        """Discount by this mode's rho, then add ``reward``; returns the pre-update baseline."""
        first = self.visits(pid) == 0
        v_before, n_before = self.value(pid), self.n_eff(pid)
        rho, d = self.rho(pid, drift)
        self.update(pid, reward, rho)
        return TrackerUpdate(pid, v_before, self.value(pid), n_before, rho, d, first)

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume exactly (plain Python types; JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "rho_mode": self.rho_mode,
            "rho_min": self.rho_min,
            "rho_max": self.rho_max,
            "d_half": self.d_half,
            "rho_constant": self.rho_constant,
            "prior_alpha": self.prior_alpha,
            "prior_beta": self.prior_beta,
            "alpha": dict(self._alpha),
            "beta": dict(self._beta),
            "visits": dict(self._visits),
            "cum_drift": self._cum_drift,
            "steps": self._steps,
            "drift_at_visit": dict(self._drift_at_visit),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported tracker state version {state.get('version')!r}")
        fresh = ValueTracker(
            rho_mode=state["rho_mode"],
            rho_min=state["rho_min"],
            rho_max=state["rho_max"],
            d_half=state["d_half"],
            rho_constant=state["rho_constant"],
            prior_alpha=state["prior_alpha"],
            prior_beta=state["prior_beta"],
        )
        self.__dict__.update(fresh.__dict__)
        alpha = {str(k): float(v) for k, v in state["alpha"].items()}
        beta = {str(k): float(v) for k, v in state["beta"].items()}
        visits = {str(k): int(v) for k, v in state["visits"].items()}
        marks = {str(k): float(v) for k, v in state["drift_at_visit"].items()}
        cum_drift = float(state["cum_drift"])
        if alpha.keys() != beta.keys():
            raise ValueError("tracker state has alpha and beta for different prompts")
        if not (visits.keys() <= alpha.keys() and marks.keys() <= alpha.keys()):
            raise ValueError("tracker state has visit records for prompts without alpha/beta")
        for pid in alpha:
            a, b = alpha[pid], beta[pid]
            if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0 and a + b > 0):
                raise ValueError(f"tracker state for {pid!r} is not a valid Beta: ({a}, {b})")
        if not all(math.isfinite(m) and 0.0 <= m <= cum_drift for m in marks.values()):
            raise ValueError("tracker state has drift marks outside [0, cum_drift]")
        self._alpha, self._beta, self._visits, self._drift_at_visit = alpha, beta, visits, marks
        self._cum_drift = _finite_drift(cum_drift)
        self._steps = int(state["steps"])

    @classmethod
    def from_state_dict(cls, state: Mapping) -> ValueTracker:
        tracker = cls()
        tracker.load_state_dict(state)
        return tracker


def _check_reward(reward: float) -> float:
    """The reward as a Python float in [0, 1] (numpy and torch scalars are converted)."""
    # None means "not scorable": such an episode is dropped upstream, never fed here as 0.
    r = float("nan") if reward is None else float(reward)
    if not 0.0 <= r <= 1.0:
        raise ValueError(
            f"tracker rewards must lie in [0, 1] (got {reward!r}); rescale other reward ranges"
        )
    return r


def _finite_drift(drift: float) -> float:
    """A drift D as a Python float; it must be finite and >= 0."""
    d = float(drift)
    if not (d >= 0.0 and math.isfinite(d)):
        raise ValueError(f"policy drift D must be a finite number >= 0, got {drift!r}")
    return d
