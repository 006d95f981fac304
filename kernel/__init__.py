"""conclave-kernel: many LLM agents deliberating on one topic, under trio.

The public surface is everything in ``__all__`` plus :mod:`kernel.validate` (the
boundary checks adapters share); the underscore modules behind it are private.
``kernel`` imports only trio, attrs and the standard library.
"""

from kernel._dual_halt import DualChannelHaltChecker
from kernel._errors import (
    AgentBusyError,
    AgentNotFoundError,
    AgentPoolExhaustedError,
    ConclaveError,
    HaltClearDeniedError,
    InvalidRequestError,
)
from kernel._frozenmap import FrozenMap
from kernel._halt import (
    DEFAULT_HALT_READ_TIMEOUT,
    NO_REASON,
    HaltSwitch,
    check_clear_approvers,
    check_halt_reason,
    read_halt,
)
from kernel._metrics import MetricsSnapshot, ServiceMetrics, nearest_rank
from kernel._outcome_errors import AgentInvocationError, SystemHaltedError
from kernel._pool import Admission, AgentPool
from kernel._ports import (
    AgentOrchestratorProtocol,
    BatchAcquirer,
    BatchLog,
    CommitReceipt,
    HaltChecker,
    HaltControl,
    HaltNotifier,
    HaltProbe,
    HaltRecord,
    HaltWaiter,
    LeaseLossNotifier,
    OutputWitness,
    RecordedBatch,
    SharedCapacity,
)
from kernel._rate import RateLimit, RateLimitStatistics
from kernel._resume import RESUMED, context_fingerprint
from kernel._service import ConcurrentDeliberationService, Overflow, ProgressCallback
from kernel._tail import HedgePolicy
from kernel._types import (
    MAX_CONCURRENT_AGENTS,
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_TOPIC_BYTES,
    AgentFailure,
    AgentOutput,
    AgentRequest,
    AgentStatus,
    AgentStatusInfo,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    PoolStatistics,
    PoolStatus,
    utc_now,
)
from kernel.events import KernelEvent, KernelObserver

#: The release, the one place it is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [
    "KernelObserver",
    "KernelEvent",
    "DEFAULT_HALT_READ_TIMEOUT",
    "MAX_CONCURRENT_AGENTS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_TOPIC_BYTES",
    "NO_REASON",
    "Admission",
    "AgentBusyError",
    "AgentFailure",
    "AgentInvocationError",
    "AgentNotFoundError",
    "AgentOrchestratorProtocol",
    "AgentOutput",
    "AgentPool",
    "AgentPoolExhaustedError",
    "AgentRequest",
    "AgentStatus",
    "AgentStatusInfo",
    "BatchLog",
    "CommitReceipt",
    "ConclaveError",
    "ConcurrentDeliberationService",
    "ConcurrentResult",
    "ContextBundle",
    "DualChannelHaltChecker",
    "FailureKind",
    "FrozenMap",
    "HaltChecker",
    "HaltClearDeniedError",
    "HaltControl",
    "HaltNotifier",
    "HaltProbe",
    "HaltRecord",
    "HaltSwitch",
    "HaltWaiter",
    "BatchAcquirer",
    "LeaseLossNotifier",
    "HedgePolicy",
    "InvalidRequestError",
    "MetricsSnapshot",
    "Overflow",
    "OutputWitness",
    "PoolStatistics",
    "PoolStatus",
    "ProgressCallback",
    "RESUMED",
    "RecordedBatch",
    "RateLimit",
    "RateLimitStatistics",
    "ServiceMetrics",
    "SharedCapacity",
    "SystemHaltedError",
    "check_clear_approvers",
    "check_halt_reason",
    "context_fingerprint",
    "nearest_rank",
    "read_halt",
    "utc_now",
]

import logging as _logging

# A library logs; the application decides where logs go.
_logging.getLogger("kernel").addHandler(_logging.NullHandler())
