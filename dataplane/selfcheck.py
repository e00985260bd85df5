"""Setup self-check: BCC imports, compiles a small tc program and loads it into the kernel.

Run by scripts/setup.sh; prints what is wrong in plain words and exits non-zero if anything is.
"""

from __future__ import annotations

import os
import platform
import sys
import time

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
int selfcheck(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > end)
        return TC_ACT_OK;
    return TC_ACT_OK;
}
"""


def main() -> int:
    if os.geteuid() != 0:
        print("self-check: not root: loading BPF programs needs root", file=sys.stderr)
        return 1
    try:
        from bcc import BPF  # noqa: PLC0415 - the import itself is what is checked
    except ImportError as exc:
        print(f"self-check: cannot import bcc ({exc}); install the distribution's python3-bpfcc "
              "and create the venv with --system-site-packages (never 'pip install bcc')", file=sys.stderr)
        return 1
    build = f"/lib/modules/{platform.release()}/build"
    started = time.monotonic()
    try:
        bpf = BPF(text=PROGRAM)
        fn = bpf.load_func("selfcheck", BPF.SCHED_CLS)
    except Exception as exc:  # BCC raises plain Exception on compile/load failure
        print(f"self-check: BCC could not compile or load a tc program: {exc}\n"
              f"  headers used: {os.path.realpath(build)}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    fd = fn.fd
    bpf.cleanup()
    print(f"[setup] self-check: BCC compiled and loaded a tc program (fd {fd}, {took:.1f}s) "
          f"with headers {os.path.realpath(build)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
