"""The config: a typed tree (`schema`), coerced from and to plain data (`convert`), loaded from YAML
and overrides (`load`), checked across keys (`checks`), listed by `jaxlm config` (`cli`). The names most code needs are re-exported here."""

from jaxlm.config.convert import from_dict, to_dict, to_yaml
from jaxlm.config.load import load_config
from jaxlm.config.schema import (CheckpointConfig, Config, DataConfig, DiffusionConfig, DistillConfig, Doc,
                                 DPOConfig, GRPOConfig, LoraConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig,
                                 ProfileConfig, PruneConfig, RopeScalingConfig, SourceConfig, TrainConfig,
                                 WandbConfig)
from jaxlm.errors import ConfigError

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "DistillConfig", "Doc",
           "DPOConfig", "GRPOConfig", "LoraConfig", "MeshConfig", "ModelConfig", "MoEConfig", "OptimConfig",
           "ProfileConfig", "PruneConfig", "RopeScalingConfig", "SourceConfig", "TrainConfig", "WandbConfig",
           "from_dict", "load_config", "to_dict", "to_yaml"]
