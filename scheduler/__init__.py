"""Length-aware scheduling over Sequences: pure data structures, no torch, no model."""
from lenserve.scheduler.block_manager import BlockManager
from lenserve.scheduler.config import SchedulerConfig
from lenserve.scheduler.output import SchedulerOutput, SchedulerStats
from lenserve.scheduler.policies import make_policy
from lenserve.scheduler.scheduler import Scheduler
from lenserve.scheduler.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "Sequence",
    "SequenceStatus",
    "make_policy",
]
