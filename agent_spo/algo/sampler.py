"""Prioritised prompt sampling (spec §4, paper Eq. 11).

    w(x) = sqrt(v_hat(x) * (1 - v_hat(x))) / n_eff(x) ** gamma + eps

Prompts whose outcome is most uncertain (v_hat near 1/2) are drawn most; ``eps`` keeps
solved and hopeless prompts in play. ``gamma = 0`` is paper v2; the ICLR version divides
by ``n_eff ** gamma`` to draw well-estimated prompts less. ``mode="uniform"`` gives every
prompt the same weight (the GRPO baseline).

In a stream, :meth:`PrioritizedSampler.draw` picks one prompt at a time with probability
proportional to w among the prompts not currently in flight, and marks it in flight
until :meth:`release`. :meth:`draw_batch` draws k distinct prompts at once (the
reference recipe's batch mode: successive draws without replacement).

The sampler caches one weight per prompt; the caller refreshes a prompt's weight after
the tracker updates it (:meth:`refresh`), so a draw costs O(#prompts) in numpy, not a
Python loop over the tracker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

SamplerMode = Literal["prioritized", "uniform"]

_STATE_VERSION = 1


def priority_weights(
    v_hat: np.ndarray, n_eff: np.ndarray, eps: float = 0.05, gamma: float = 0.0
) -> np.ndarray:
    """w = sqrt(v_hat (1 - v_hat)) / n_eff^gamma + eps   (paper Eq. 11; ICLR gamma term)."""
    v = np.asarray(v_hat, dtype=np.float64)
    n = np.asarray(n_eff, dtype=np.float64)
    spread = np.sqrt(np.clip(v * (1.0 - v), 0.0, None))
    if gamma != 0.0:
        spread = spread / np.power(n, gamma)
    return spread + eps


class PrioritizedSampler:
    """Draws prompt ids ∝ w from the prompts not in flight; seeded, with exact state round trip."""

    def __init__(
        self,
        prompt_ids: Sequence[str],
        *,
        v_hat: Sequence[float] | np.ndarray | None = None,
        n_eff: Sequence[float] | np.ndarray | None = None,
        eps: float = 0.05,
        gamma: float = 0.0,
        mode: SamplerMode = "prioritized",
        seed: int = 0,
    ) -> None:
        if mode not in ("prioritized", "uniform"):
            raise ValueError(f"unknown sampler mode {mode!r}; allowed: 'prioritized', 'uniform'")
        if eps < 0.0 or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"need eps >= 0 and gamma in [0, 1], got eps={eps}, gamma={gamma}")
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the sampler needs at least one prompt")
        self._index = {pid: i for i, pid in enumerate(ids)}
        if len(self._index) != len(ids):
            raise ValueError("prompt ids must be unique")
        self.prompt_ids = ids
        self.eps, self.gamma, self.mode = eps, gamma, mode
        n = len(ids)
        self._v_hat = np.full(n, 0.5) if v_hat is None else np.asarray(v_hat, np.float64).copy()
        self._n_eff = np.ones(n) if n_eff is None else np.asarray(n_eff, np.float64).copy()
        if self._v_hat.shape != (n,) or self._n_eff.shape != (n,):
            raise ValueError("v_hat and n_eff need one entry per prompt id")
        _check_values(self._v_hat, self._n_eff)
        self._in_flight = np.zeros(n, dtype=bool)
        self._rng = np.random.default_rng(seed)
        self._weights = self._compute(self._v_hat, self._n_eff)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    # -------------------------------------------------------------------- weights
    def _compute(self, v: np.ndarray, n: np.ndarray) -> np.ndarray:
        if self.mode == "uniform":
            return np.ones_like(v)
        return priority_weights(v, n, self.eps, self.gamma)

    def refresh(self, pid: str, v_hat: float, n_eff: float) -> None:
        """Re-weight one prompt after its tracker update."""
        i = self._index[pid]
        _check_values(np.array([v_hat]), np.array([n_eff]))
        self._v_hat[i], self._n_eff[i] = v_hat, n_eff
        self._weights[i] = self._compute(self._v_hat[i : i + 1], self._n_eff[i : i + 1])[0]

    def weights(self) -> np.ndarray:
        """Current weight of every prompt, in ``prompt_ids`` order (a copy)."""
        return self._weights.copy()

    def probabilities(self) -> np.ndarray:
        """Probability of each prompt on the next :meth:`draw` (0 for prompts in flight)."""
        w = np.where(self._in_flight, 0.0, self._weights)
        total = w.sum()
        if total <= 0.0:  # every free prompt has weight 0 (eps = 0): fall back to uniform
            w = (~self._in_flight).astype(np.float64)
            total = w.sum()
        if total == 0.0:
            raise RuntimeError(
                f"all {len(self)} prompts are in flight; release finished ones or add prompts"
            )
        return w / total

    # ---------------------------------------------------------------------- draws
    @property
    def in_flight(self) -> list[str]:
        return [self.prompt_ids[i] for i in np.flatnonzero(self._in_flight)]

    def draw(self) -> str:
        """One prompt ∝ w among those not in flight; it stays in flight until released."""
        p = self.probabilities()
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        if i >= len(cdf) or p[i] == 0.0:  # u * cdf[-1] rounded onto the last step
            i = int(np.flatnonzero(p)[-1])
        self._in_flight[i] = True
        return self.prompt_ids[i]

    def draw_batch(self, k: int) -> list[str]:
        """k distinct prompts by successive draws ∝ w without replacement; all marked in flight."""
        free = int((~self._in_flight).sum())
        if not 0 < k <= free:
            raise ValueError(f"cannot draw {k} distinct prompts: {free} are not in flight")
        p = self.probabilities()
        if np.count_nonzero(p) < k:
            raise ValueError(
                f"cannot draw {k} distinct prompts: only {np.count_nonzero(p)} have a positive"
                " weight (eps = 0 and the rest are solved or hopeless); use eps > 0"
            )
        idx = self._rng.choice(len(self), size=k, replace=False, p=p)
        self._in_flight[idx] = True
        return [self.prompt_ids[i] for i in idx]

    def release(self, pid: str) -> None:
        """The prompt's episode finished (or was dropped): it may be drawn again."""
        i = self._index[pid]
        if not self._in_flight[i]:
            raise ValueError(f"prompt {pid!r} is not in flight")
        self._in_flight[i] = False

    def release_all(self) -> None:
        """Forget every in-flight prompt (e.g. on resume, when those episodes are gone)."""
        self._in_flight[:] = False

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "prompt_ids": list(self.prompt_ids),
            "eps": self.eps,
            "gamma": self.gamma,
            "mode": self.mode,
            "v_hat": self._v_hat.tolist(),
            "n_eff": self._n_eff.tolist(),
            "in_flight": self.in_flight,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        if list(state["prompt_ids"]) != self.prompt_ids:
            raise ValueError(
                "sampler state was saved for a different prompt set "
                f"({len(state['prompt_ids'])} ids vs {len(self)}); the dataset changed"
            )
        self.eps, self.gamma, self.mode = state["eps"], state["gamma"], state["mode"]
        self._v_hat = np.asarray(state["v_hat"], dtype=np.float64)
        self._n_eff = np.asarray(state["n_eff"], dtype=np.float64)
        if self._v_hat.shape != (len(self),) or self._n_eff.shape != (len(self),):
            raise ValueError("sampler state has the wrong number of values")
        _check_values(self._v_hat, self._n_eff)
        self._weights = self._compute(self._v_hat, self._n_eff)
        self._in_flight[:] = False
        for pid in state["in_flight"]:
            self._in_flight[self._index[pid]] = True
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]

    def refresh_many(self, items: Iterable[tuple[str, float, float]]) -> None:
        for pid, v, n in items:
            self.refresh(pid, v, n)


def _check_values(v_hat: np.ndarray, n_eff: np.ndarray) -> None:
    if not (np.isfinite(v_hat).all() and np.isfinite(n_eff).all()):
        raise ValueError("sampler values v_hat and n_eff must be finite")
    if ((v_hat < 0) | (v_hat > 1)).any() or (n_eff <= 0).any():
        raise ValueError("sampler needs v_hat in [0, 1] and n_eff > 0")
