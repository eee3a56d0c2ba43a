"""The one typed configuration tree (layer 1: imports nothing else of the package).

Loaded from YAML (``--config``) with dotted overrides (``--set student.drop_path_rate=0.2``);
unknown keys and wrong types are errors naming the key. Every field's default and help text
live in :mod:`.schema`, :mod:`.sections` and :mod:`.runtime`; ``docs/config.md`` is generated from them.
"""

from .fields import ConfigError, flatten, to_dict
from .loading import dump_config, load_config, parse_override, yaml_load
from .reference import config_reference, config_reference_markdown
from .runtime import ClusterConfig, KubernetesConfig, SlurmConfig, TrackingConfig
from .schema import Config, validate
from .sections import (
    OOD_SCORES,
    AnalysisConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    ExportConfig,
    OODScore,
    PseudoLabelConfig,
    PseudoTrainConfig,
    StudentConfig,
    TrainConfig,
)

__all__ = [
    "OOD_SCORES",
    "AnalysisConfig",
    "AugmentConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "KubernetesConfig",
    "OODScore",
    "PseudoLabelConfig",
    "PseudoTrainConfig",
    "SlurmConfig",
    "StudentConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_reference",
    "config_reference_markdown",
    "dump_config",
    "flatten",
    "load_config",
    "parse_override",
    "to_dict",
    "validate",
    "yaml_load",
]
