"""Where the eBPF C sources are: `dataplane/bpf/`, shipped as package data of `dataplane`.

Responsibility: the one place that locates the C side, for the loader (which hands BCC the
compilation unit and the include directory) and for the Python mirrors of its headers. The
sources sit next to this module in a source tree, in an editable install and in a normal
(wheel) install alike, so nothing here depends on where the repository is. BCC needs real
files (`-I` and `src_file`), which is why these are `Path`s and not importlib resources that
could live inside an archive.
"""

from __future__ import annotations

from pathlib import Path

BPF_DIR: Path = Path(__file__).resolve().parent / "bpf"
"""The directory of the compilation unit (`datapath.c`) and its headers (`lib/*.h`)."""

MAIN_SOURCE: Path = BPF_DIR / "datapath.c"
"""The one compilation unit: every map and both tc programs."""
