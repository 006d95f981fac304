"""conclave-kernel: many LLM agents deliberating on one topic, under trio.

The public surface is everything in ``__all__``; the modules behind it are private.
``kernel`` imports only trio, attrs and the standard library.
"""

from kernel._dual_halt import DualChannelHaltChecker
from kernel._errors import (
    AgentBusyError,
    AgentInvocationError,
    AgentNotFoundError,
    AgentPoolExhaustedError,
    ConclaveError,
    HaltClearDeniedError,
    InvalidRequestError,
    SystemHaltedError,
)
from kernel._frozenmap import FrozenMap
from kernel._halt import HaltRecord, HaltSwitch
from kernel._metrics import MetricsSnapshot, ServiceMetrics
from kernel._pool import Admission, AgentPool
from kernel._ports import (
    AgentOrchestratorProtocol,
    CommitReceipt,
    HaltChecker,
    HaltNotifier,
    HaltProbe,
    HaltWaiter,
    OutputWitness,
)
from kernel._service import ConcurrentDeliberationService, Overflow, ProgressCallback
from kernel._types import (
    MAX_CONCURRENT_AGENTS,
    AgentFailure,
    AgentOutput,
    AgentRequest,
    AgentStatus,
    AgentStatusInfo,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    PoolStatus,
)

__all__ = [
    "MAX_CONCURRENT_AGENTS",
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
    "HaltNotifier",
    "HaltProbe",
    "HaltRecord",
    "HaltSwitch",
    "HaltWaiter",
    "InvalidRequestError",
    "MetricsSnapshot",
    "Overflow",
    "OutputWitness",
    "PoolStatus",
    "ProgressCallback",
    "ServiceMetrics",
    "SystemHaltedError",
]

import logging as _logging

# A library logs; the application decides where logs go.
_logging.getLogger("kernel").addHandler(_logging.NullHandler())
