"""The lab agent: the process that keeps a lab started by `l7lab up` observable and changeable.

Only the process that loaded the BPF programs holds their maps and ring buffer, so `up` forks
the agent before anything is built and the agent lives as long as the lab does. It is two parts:

- `process` (`dataplane/agent/process.py`): being a process. The fork and the READY/ERROR pipe,
  dying with the command until READY, daemonizing into the node namespace and the lab's record,
  the control socket `agent.sock` and its protocol (one JSON request, one JSON reply; `request`
  is the CLI's side), and the loop;
- `service` (`dataplane/agent/service.py`): what it does for the lab. Kernel flow records,
  metrics (`metrics.json`, Prometheus), supervision of the L7 proxy, and policy changes applied
  all-or-nothing by their deadline through the policy engine's propose/commit, rolled back when
  they cannot be enforced, finish late or cannot be confirmed to their caller.
"""

from .process import (
    INSPECT_TIMEOUT,
    MAX_DUMP_REPLY,
    REQUEST_TIMEOUT,
    SOCKET_NAME,
    STATUS_TIMEOUT,
    AgentProcess,
    adopt,
    request,
    socket_path,
    start,
)
from .service import CHANGE_BUDGET, PROXY_CONFIRM_TIMEOUT, ROLLBACK_BUDGET, ChangeRefused, LabService

__all__ = ["CHANGE_BUDGET", "INSPECT_TIMEOUT", "MAX_DUMP_REPLY", "PROXY_CONFIRM_TIMEOUT", "REQUEST_TIMEOUT", "ROLLBACK_BUDGET", "SOCKET_NAME",
           "STATUS_TIMEOUT", "AgentProcess", "ChangeRefused", "LabService", "adopt", "request", "socket_path",
           "start"]
