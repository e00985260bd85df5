"""Flow verdicts, drop reasons and hooks of the BPF datapath (bpf/lib/drop.h, HOOK_* in
bpf/lib/common.h), under the name most of l7lab imports them by.

They are declared once, with every other constant shared with the C side, in dataplane/abi.py;
this module only re-exports them. Shared by the loader (decoding events and metrics), flow
views and Prometheus labels. Pure Python, no bcc.
"""

from __future__ import annotations

from .abi import DropReason, FlowVerdict, Hook

__all__ = ["DropReason", "FlowVerdict", "Hook"]
