"""Run configuration: the pydantic schema (`schema`) and the YAML loader (`loader`).

    from agent_spo.config import TrainConfig, load_config, check_trainable

`load_config(path, overrides)` gives a validated TrainConfig or raises ConfigError with
one line per problem, each naming its dotted key and where it came from.
`check_trainable(cfg)` lists what `train` refuses in a valid config. Other commands
with their own schema (the eval config) build on `Section` and `load_yaml_config`.
"""

from agent_spo.config.loader import (
    ConfigError,
    dump_config,
    load_config,
    load_yaml_config,
    write_resolved,
)
from agent_spo.config.schema import (
    AlgoConfig,
    ClusterConfig,
    DataConfig,
    GrpoConfig,
    InitConfig,
    LearnerConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RhoConfig,
    RolloutConfig,
    RunConfig,
    SamplerConfig,
    SandboxConfig,
    Section,
    TrainConfig,
    TrainLoopConfig,
    VerifierConfig,
    check_trainable,
)

__all__ = [
    "AlgoConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "GrpoConfig",
    "InitConfig",
    "LearnerConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "RhoConfig",
    "RolloutConfig",
    "RunConfig",
    "SamplerConfig",
    "SandboxConfig",
    "Section",
    "TrainConfig",
    "TrainLoopConfig",
    "VerifierConfig",
    "check_trainable",
    "dump_config",
    "load_config",
    "load_yaml_config",
    "write_resolved",
]
