"""l7lab data plane: scenario model, topology, lab lifecycle, policy resolution and the CLI.

Data flows one way: describe -> resolve -> program -> enforce -> observe (see docs/datapath.md).
"""

__version__ = "0.1.0"
