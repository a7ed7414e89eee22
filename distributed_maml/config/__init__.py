"""The run's configuration: typed sections (`sections`), parsed from TOML and --set overrides
with one-line errors (`loading`). The base layer: imports nothing of the package but `errors`."""

from distributed_maml.config.loading import apply_overrides, dumps, from_dict, load, set_values
from distributed_maml.config.sections import (
    SECTIONS,
    Config,
    MamlConfig,
    ModelConfig,
    OptimizerConfig,
    ScalingConfig,
    TaskConfig,
    TrainingConfig,
)
from distributed_maml.config.task import Source
from distributed_maml.config.values import (
    ALGORITHMS,
    FAMILIES,
    GPU_STEPS,
    LEARN_INNER_LR,
    MODELS,
    MODES,
    NONFINITE_POLICIES,
    PLACEMENTS,
    SELECT_BY,
    STORE_SHARING,
    TASK_MAPS,
    is_import_path,
)

__all__ = [
    "ALGORITHMS",
    "FAMILIES",
    "GPU_STEPS",
    "LEARN_INNER_LR",
    "MODELS",
    "MODES",
    "NONFINITE_POLICIES",
    "PLACEMENTS",
    "SECTIONS",
    "SELECT_BY",
    "STORE_SHARING",
    "TASK_MAPS",
    "Config",
    "MamlConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScalingConfig",
    "Source",
    "TaskConfig",
    "TrainingConfig",
    "apply_overrides",
    "set_values",
    "dumps",
    "from_dict",
    "is_import_path",
    "load",
]
