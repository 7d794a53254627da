"""``algo.rho.mode = kl_exact``: D(x) measured on x's previous trajectory (spec §1).

The reference recipe's discount. For every prompt the store keeps its last *trained*
trajectory and that trajectory's log-probs under the policy right after the update that
trained it ("then"). When x is observed again, the learner scores that trajectory under
the policy as it is now, and

    D(x) = mean over its model-sampled tokens of |logp_then - logp_now|

(tool and template tokens are left out, as in the learner's loss and in ``kl_version``'s
drift). A prompt observed for the first time, or whose last trajectory was never
trained (it went stale), has no trajectory kept: D = 0, as a first visit.

Memory. A record holds the prompt's token ids (int32, 4 bytes each) and, per response
token, its id, its log-prob then (float32) and whether it was sampled (1 byte): 4 bytes
per prompt token, 9 per response token (the response holds the tool outputs too). At
the paper's scale, 17k prompts each kept at the caps (2,048 prompt tokens; 16,384
generated tokens plus 8 tool outputs of at most 256 characters, about 2,300 tokens with
their tags), that is 17,000 x (8,192 + 18,700 x 9) bytes = 3.0 GB of host memory in the
worst case, and less in practice (responses rarely all reach the cap). It stays in
memory (no spill to disk: a trainer node has that much to spare), and each checkpoint
writes it as one ``kl_exact.npz`` (writing briefly holds a second copy).

Cost. One no-grad learner pass per step over the kept trajectories of the step's
prompts, and one over the step's batch (the "then" of the next visit): two passes, as
in the reference. The pipeline reports it as ``tracker/kl_exact_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent_spo.episode.trajectory import Segment, Trajectory

FILE = "kl_exact.npz"


@dataclass(frozen=True)
class _Record:
    prompt: np.ndarray  # int32 [P]
    response: np.ndarray  # int32 [R]
    sampled: np.ndarray  # bool [R]: model-sampled tokens (the mean runs over them)
    logp_then: np.ndarray  # float32 [R]: under the policy right after its update

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.prompt, self.response, self.sampled, self.logp_then))


class ExactDrift:
    """Each prompt's last trained trajectory, compact, and the drift measured on it."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    def remember(self, key: str, traj: Trajectory, logp_then: Sequence[float] | np.ndarray) -> None:
        """Keep ``traj`` as ``key``'s last trajectory, with its response tokens' log-probs
        under the policy right after the update that trained it."""
        response = np.asarray(traj.response_token_ids, dtype=np.int32)
        logp = np.asarray(logp_then, dtype=np.float32).reshape(-1)
        if logp.shape != response.shape:
            raise ValueError(f"{key!r}: {logp.size} log-probs for {response.size} response tokens")
        sampled = np.asarray(traj.loss_mask, dtype=bool)
        # only sampled tokens are ever read; the rest are zeros (a log-prob of a tool
        # token is not a sample's, and the rebuilt trajectory needs values <= 0)
        logp = np.where(sampled, np.minimum(logp, 0.0), 0.0).astype(np.float32)
        prompt = np.asarray(traj.prompt_token_ids, dtype=np.int32)
        self._records[key] = _Record(prompt, response, sampled, logp)

    def trajectory(self, key: str) -> Trajectory:
        """``key``'s kept trajectory, rebuilt for the learner to score: model segments
        where tokens were sampled, tool segments elsewhere."""
        r = self._records[key]
        segments = []
        start = 0
        for end in range(1, len(r.response) + 1):
            if end == len(r.response) or r.sampled[end] != r.sampled[start]:
                ids = tuple(int(t) for t in r.response[start:end])
                if r.sampled[start]:
                    lp = tuple(float(x) for x in r.logp_then[start:end])
                    segments.append(Segment("model", ids, lp, 0))
                else:
                    segments.append(Segment("tool", ids))
                start = end
        return Trajectory(key, tuple(int(t) for t in r.prompt), tuple(segments))

    def drift(self, key: str, logp_now: Sequence[float] | np.ndarray) -> float:
        """D = mean |logp_then - logp_now| over the kept trajectory's sampled tokens."""
        r = self._records[key]
        now = np.asarray(logp_now, dtype=np.float64).reshape(-1)
        if now.shape != r.logp_then.shape:
            raise ValueError(f"{key!r}: {now.size} log-probs for {r.logp_then.size} tokens")
        if not r.sampled.any():
            return 0.0
        diff = np.abs(r.logp_then.astype(np.float64) - now)[r.sampled]
        return float(diff.mean())

    def snapshot(self) -> ExactDrift:
        """A copy to write from a thread while this one keeps changing (records are
        replaced, never changed in place, so a shallow copy is enough)."""
        copy = ExactDrift()
        copy._records = dict(self._records)
        return copy

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """One ``.npz``: the keys, and each array of every record end to end."""
        keys = list(self._records)
        recs = [self._records[k] for k in keys]
        np.savez(
            Path(path),
            keys=np.asarray(keys, dtype=np.str_),
            prompt_len=np.asarray([len(r.prompt) for r in recs], dtype=np.int64),
            response_len=np.asarray([len(r.response) for r in recs], dtype=np.int64),
            prompt=_cat([r.prompt for r in recs], np.int32),
            response=_cat([r.response for r in recs], np.int32),
            sampled=_cat([r.sampled for r in recs], bool),
            logp_then=_cat([r.logp_then for r in recs], np.float32),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExactDrift:
        store = cls()
        with np.load(Path(path)) as f:
            p_at = np.concatenate([[0], np.cumsum(f["prompt_len"])])
            r_at = np.concatenate([[0], np.cumsum(f["response_len"])])
            prompt, response = f["prompt"], f["response"]
            sampled, logp = f["sampled"], f["logp_then"]
            for i, key in enumerate(f["keys"].tolist()):
                a, b = r_at[i], r_at[i + 1]
                store._records[str(key)] = _Record(
                    prompt[p_at[i] : p_at[i + 1]].copy(), response[a:b].copy(),
                    sampled[a:b].copy(), logp[a:b].copy(),
                )  # fmt: skip
        return store


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
