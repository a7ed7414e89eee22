"""Tasks: the Arrow task store (format, building, reading), the task families that fill it,
and the sampler that picks each meta-step's tasks. Imports only the package's base modules."""

from distributed_maml.data.episodes import TASK_IDS, EpisodeSpec
from distributed_maml.data.format import COLUMNS, StoreInfo, image_info
from distributed_maml.data.onthefly import episodes_of, plan_stream
from distributed_maml.data.store import TaskStore, describe
from distributed_maml.data.writing import (
    build,
    build_from_images,
    build_from_table,
    build_in_memory,
    generate_batches,
    write_batches,
)

__all__ = [
    "COLUMNS",
    "TASK_IDS",
    "EpisodeSpec",
    "episodes_of",
    "plan_stream",
    "StoreInfo",
    "TaskStore",
    "build",
    "build_from_images",
    "build_from_table",
    "build_in_memory",
    "describe",
    "generate_batches",
    "image_info",
    "write_batches",
]
