"""Where each process of a cluster run goes: the bundles a config asks for, and a
placement of them on nodes that mirrors Ray's (learner ranks and engine replicas packed,
sandbox servers spread, learner rank 0 on the trainer's own node).

The same function checks a config against the nodes it is laid out for
(``train --dry-run`` with ``cluster.nodes``) and against a live Ray cluster's nodes before
anything is asked of Ray, so a layout that cannot fit fails at once, naming the role that
does not fit, instead of waiting out Ray's placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("learner", "engine", "sandbox")


@dataclass(frozen=True)
class Bundle:
    """One process's reservation: ``role`` and its ``index`` among that role's processes."""

    role: str
    index: int
    cpus: float
    gpus: int

    @property
    def name(self) -> str:
        return {"learner": "learner rank", "engine": "engine replica", "sandbox": "sandbox server"}[
            self.role
        ] + f" {self.index}"


@dataclass
class Node:
    name: str
    cpus: float
    gpus: int
    used_cpus: float = 0.0
    used_gpus: int = 0
    bundles: list[Bundle] = field(default_factory=list)

    def room(self, b: Bundle) -> bool:
        return self.used_cpus + b.cpus <= self.cpus + 1e-9 and self.used_gpus + b.gpus <= self.gpus

    def take(self, b: Bundle) -> None:
        self.used_cpus += b.cpus
        self.used_gpus += b.gpus
        self.bundles.append(b)


class PlacementError(ValueError):
    """The bundles do not fit the nodes."""


def bundles(cluster, world_size: int) -> dict[str, list[Bundle]]:
    """Every role's bundles for a ``cluster`` config section and the learner's world size."""
    c = cluster
    return {
        "learner": [
            Bundle("learner", i, c.learner_cpus, c.learner_gpus) for i in range(world_size)
        ],
        "engine": [
            Bundle("engine", i, c.engine_cpus, c.engine_gpus) for i in range(c.engine_replicas)
        ],
        "sandbox": [Bundle("sandbox", i, c.sandbox_cpus, 0) for i in range(c.sandbox_servers)],
    }


def place(wanted: dict[str, list[Bundle]], nodes: list[Node], *, spread_sandboxes: bool = True):
    """Assign every bundle to a node (``nodes[0]`` is the trainer's); returns ``nodes``
    with their bundles. Raises :class:`PlacementError` naming the first bundle that does
    not fit and what the nodes have left."""
    if not nodes:
        raise PlacementError("the cluster has no nodes")

    def first_fit(b: Bundle, order: list[Node]) -> None:
        for n in order:
            if n.room(b):
                n.take(b)
                return
        left = ", ".join(
            f"{n.name}: {n.cpus - n.used_cpus:g} CPUs, {n.gpus - n.used_gpus} GPUs free"
            for n in nodes
        )
        raise PlacementError(f"{b.name} ({b.cpus:g} CPUs, {b.gpus} GPUs) does not fit: {left}")

    learners = wanted.get("learner", [])
    if learners:  # rank 0 is the trainer process: it runs where `train` was started
        b0 = learners[0]
        if not nodes[0].room(b0):
            raise PlacementError(
                f"{b0.name} is the trainer itself and needs {b0.cpus:g} CPUs and {b0.gpus} "
                f"GPUs on the node `train` runs on ({nodes[0].name}: {nodes[0].cpus:g} "
                f"CPUs, {nodes[0].gpus} GPUs)"
            )
        nodes[0].take(b0)
    for b in learners[1:]:  # packed: the trainer's node first, so the ranks stay together
        first_fit(b, nodes)
    for b in wanted.get("engine", []):  # packed onto the nodes with the most GPUs left
        first_fit(b, sorted(nodes, key=lambda n: -(n.gpus - n.used_gpus)) if b.gpus else nodes)
    for b in wanted.get("sandbox", []):
        # spread: each server goes to the node with the fewest servers (then most CPUs left)
        order = (
            sorted(nodes, key=lambda n: (_count(n, "sandbox"), -(n.cpus - n.used_cpus)))
            if spread_sandboxes
            else nodes
        )
        first_fit(b, order)
    return nodes


def _count(n: Node, role: str) -> int:
    return sum(b.role == role for b in n.bundles)


def describe(nodes: list[Node]) -> str:
    """The placement as a table: one line per node."""
    lines = []
    for n in nodes:
        groups: dict[str, list[int]] = {}
        for b in n.bundles:
            groups.setdefault(b.role, []).append(b.index)
        parts = [f"{_plural(role, len(ix))} {_ranges(ix)}" for role, ix in groups.items()] or [
            "nothing"
        ]
        lines.append(
            f"  {n.name}: {n.used_gpus}/{n.gpus} GPUs, {n.used_cpus:g}/{n.cpus:g} CPUs: "
            + "; ".join(parts)
        )
    return "\n".join(lines)


def _plural(role: str, n: int) -> str:
    word = {"learner": "learner rank", "engine": "engine replica", "sandbox": "sandbox server"}[
        role
    ]
    return word + ("s" if n > 1 else "")


def _ranges(ix: list[int]) -> str:
    ix = sorted(ix)
    out, start = [], ix[0]
    for a, b in zip(ix, [*ix[1:], None], strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            if b is not None:
                start = b
    return ", ".join(out)


def planned_nodes(cluster) -> list[Node]:
    """The nodes a config says it is laid out for (``cluster.nodes``)."""
    return [
        Node(f"node {i}", cluster.cpus_per_node, cluster.gpus_per_node)
        for i in range(cluster.nodes or 0)
    ]


__all__ = ["Bundle", "Node", "PlacementError", "bundles", "describe", "place", "planned_nodes"]
