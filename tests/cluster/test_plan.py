"""The placement plan: which node each learner rank, engine replica and sandbox server goes
to, the check that a layout fits, and the paper's setting laid out on 2 x 8 GPUs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_spo.cli import app
from agent_spo.cluster.plan import Node, PlacementError, bundles, describe, place, planned_nodes
from agent_spo.config import ConfigError, load_config
from tests.test_memory import QWEN3_8B

EXIT_CONFIG = 2


def _roles(node: Node) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for b in node.bundles:
        out.setdefault(b.role, []).append(b.index)
    return out


def test_learner_rank_0_stays_on_the_trainers_node_and_engines_pack_onto_free_gpus():
    cfg = load_config(None, ["cluster.backend=ray", "learner.world_size=4",
                             "cluster.learner_gpus=1", "cluster.engine_replicas=3",
                             "cluster.engine_gpus=1", "cluster.sandbox_servers=3"])  # fmt: skip
    nodes = [Node("a", 16, 4), Node("b", 16, 4)]
    place(bundles(cfg.cluster, 4), nodes)
    assert _roles(nodes[0])["learner"] == [0, 1, 2, 3]
    assert _roles(nodes[1])["engine"] == [0, 1, 2]
    # spread: the three servers over both nodes, not all on one
    assert sorted(len(_roles(n).get("sandbox", [])) for n in nodes) == [1, 2]
    assert nodes[0].used_gpus == 4 and nodes[1].used_gpus == 3
    text = describe(nodes)
    assert "a: 4/4 GPUs, 5/16 CPUs: learner ranks 0-3; sandbox server" in text
    assert "b: 3/4 GPUs" in text and "engine replicas 0-2" in text


def test_a_layout_that_does_not_fit_names_the_process_and_what_is_free():
    cfg = load_config(None, ["cluster.backend=ray", "cluster.engine_replicas=3",
                             "cluster.engine_gpus=1", "cluster.learner_gpus=1"])  # fmt: skip
    with pytest.raises(PlacementError, match=r"engine replica 2 \(1 CPUs, 1 GPUs\) does not fit: "
                       r"a: \d+ CPUs, 0 GPUs free"):  # fmt: skip
        place(bundles(cfg.cluster, 1), [Node("a", 16, 3)])
    # the trainer's own node must hold rank 0
    cfg = load_config(None, ["cluster.backend=ray", "cluster.learner_gpus=1"])
    with pytest.raises(PlacementError, match="learner rank 0 is the trainer itself"):
        place(bundles(cfg.cluster, 1), [Node("cpu-head", 8, 0), Node("gpu", 8, 8)])


def test_cluster_settings_that_cannot_work_are_refused_naming_the_key():
    bad = {
        "cluster.engine_gpus=1": "learner_gpus: 0 while the engine replicas get GPUs",
        "rollout.engine=vllm": "set cluster.engine_backend vllm",
        "rollout.url=http://127.0.0.1:1": "leave rollout.url(s) and sandbox.url(s) empty",
        "sandbox.backend=docker": "set sandbox.backend local",
    }
    for override, words in bad.items():
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, ["cluster.backend=ray", override])
    with pytest.raises(ConfigError, match="engine_gpus: the hf engine runs on one device"):
        load_config(
            None, ["cluster.backend=ray", "cluster.learner_gpus=1", "cluster.engine_gpus=2"]
        )
    with pytest.raises(ConfigError, match="cluster.backend urls: set rollout.engine openai_http"):
        load_config(None, ["cluster.backend=urls"])
    with pytest.raises(ConfigError, match="cluster.backend urls: set sandbox.backend remote"):
        load_config(None, ["cluster.backend=urls", "rollout.engine=openai_http",
                           "rollout.urls=[http://127.0.0.1:1]", "model.path=/m"])  # fmt: skip
    with pytest.raises(ConfigError, match="cluster.learner_cpus"):
        load_config(None, ["cluster.learner_cpus=0"])


@pytest.fixture
def qwen3_8b(tmp_path):
    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))
    data = tmp_path / "train.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}
            for i in range(1000)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["configs/qwen3_8b_spo_cluster.yaml", f"model.path={model}", f"data.train={data}"]


def test_the_paper_setting_on_two_nodes_of_eight_gpus_validates_and_fits(qwen3_8b):
    """The dry run places 8 FSDP2 ranks on node 0, 8 vLLM replicas on node 1, the sandbox
    servers on both, with the learner's memory plan for 80 GB GPUs."""
    config, *overrides = qwen3_8b
    cfg = load_config(config, overrides)
    nodes = place(bundles(cfg.cluster, cfg.learner.world_size), planned_nodes(cfg.cluster))
    assert _roles(nodes[0]) == {"learner": list(range(8)), "sandbox": [1, 3]}
    assert _roles(nodes[1]) == {"engine": list(range(8)), "sandbox": [0, 2]}
    assert all(n.used_gpus == 8 and n.used_cpus <= 128 for n in nodes)

    result = CliRunner().invoke(app, ["train", *qwen3_8b, "--dry-run"])
    text = " ".join(result.output.split())
    assert "fits learner.gpu_memory_gb = 80" in text
    assert ("node 0: 8/8 GPUs, 112/128 CPUs: learner ranks 0-7; sandbox servers 1, 3") in text
    assert ("node 1: 8/8 GPUs, 80/128 CPUs: engine replicas 0-7; sandbox servers 0, 2") in text
    assert "cluster.nodes:" not in text  # fits: only the missing weights are refused
    assert "has no tokenizer.json" in text and result.exit_code == EXIT_CONFIG

    # one node is not enough: refused before anything starts, naming the key
    small = CliRunner().invoke(app, ["train", *qwen3_8b, "--dry-run", "cluster.nodes=1"])
    text = " ".join(small.output.split())
    assert small.exit_code == EXIT_CONFIG
    assert ("cluster.nodes: the processes do not fit 1 node(s) of 8 GPUs and 128 CPUs: "
            "engine replica 0 (4 CPUs, 1 GPUs) does not fit") in text  # fmt: skip
