"""Capabilities: what cow-apply itself has, what a plan may ask for (check.py), and the
restorer steps that give a process its dumped sets around the uid change (program.py).

The restored processes are forks of cow-apply: they start with its capability sets, and
every step below can only keep or drop what they started with (capset cannot raise the
permitted set, the bounding set only shrinks), so a restore never gives a process a
capability cow-apply does not have.  check.py refuses such a plan before anything starts,
so the restorer does not fail half way.
"""

import struct

from . import restorer as R

SETS = ("effective", "permitted", "inheritable", "bounding", "ambient")
STATUS_KEYS = {"effective": "CapEff", "permitted": "CapPrm", "inheritable": "CapInh",
               "bounding": "CapBnd", "ambient": "CapAmb"}
CAP_SETPCAP = 8
SECBIT_KEEP_CAPS = 1 << 4
SYS_CAPSET, SYS_PRCTL = 126, 157
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 24, 28, 47, 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def own():
    """cow-apply's capability sets, as /proc/self/status shows them."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            for name, status_key in STATUS_KEYS.items():
                if key == status_key:
                    out[name] = int(value, 16)
    return out


def last_cap():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def names(mask):
    """Capability numbers in mask, for messages ("7,21")."""
    return ",".join(str(i) for i in range(64) if mask >> i & 1)


def refusal(caps, securebits, mine):
    """Why a process with the dumped sets caps cannot be restored by a caller with sets
    mine, or None."""
    eff, prm, inh, bnd, amb = (caps.get(k, 0) for k in SETS)
    if eff & ~prm or amb & ~(prm & inh):
        return "inconsistent capability sets (effective or ambient outside permitted)"
    setpcap = bool(mine["effective"] >> CAP_SETPCAP & 1)
    over = prm & ~mine["permitted"]
    if over:
        return f"capabilities {names(over)} are permitted, cow-apply does not have them"
    # capset: a new inheritable set within the old one plus the bounding set, and without
    # CAP_SETPCAP also within the old one plus the permitted set
    over = inh & ~(mine["inheritable"] | (mine["bounding"] & (~0 if setpcap else mine["permitted"])))
    if over:
        return f"inheritable capabilities {names(over)} are beyond cow-apply's"
    over = bnd & ~mine["bounding"]
    if over:
        return f"bounding set holds {names(over)}, cow-apply's does not (it only shrinks)"
    if not setpcap and (mine["bounding"] & ~bnd or securebits & ~SECBIT_KEEP_CAPS):
        return "dropping from the bounding set or setting securebits needs CAP_SETPCAP, cow-apply lacks it"
    return None


def _capset(prog, eff, prm, inh):
    header = prog.struct(struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = struct.pack("<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF,
                       eff >> 32, prm >> 32, inh >> 32)
    prog.add(R.OP_SYSCALL, SYS_CAPSET, header, prog.struct(data))


def before_uid_change(prog, caps, mine):
    """While the process still has cow-apply's sets: the dumped inheritable set (before the
    bounding set shrinks, which could forbid it), the bounding set, and keep-caps so that
    setresuid to another user keeps the permitted set for after_uid_change."""
    _capset(prog, mine["permitted"], mine["permitted"], caps.get("inheritable", 0))
    drop = mine["bounding"] & ~caps.get("bounding", 0)
    for cap in range(last_cap() + 1):
        if drop >> cap & 1:
            prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_CAPBSET_DROP, cap)
    prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_KEEPCAPS, 1)


def after_uid_change(prog, caps, securebits, mine):
    """The uid change cleared the effective set: raise it again within the kept permitted set,
    raise the ambient capabilities (which need them permitted and inheritable, and no
    NO_CAP_AMBIENT_RAISE yet), set the securebits (CAP_SETPCAP), then drop to the dumped sets."""
    inh = caps.get("inheritable", 0)
    _capset(prog, mine["permitted"], mine["permitted"], inh)
    amb = caps.get("ambient", 0)
    for cap in range(64):
        if amb >> cap & 1:
            prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)
    if securebits & ~SECBIT_KEEP_CAPS:
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_SECUREBITS, securebits)
    else:  # no privilege needed
        prog.add(R.OP_SYSCALL, SYS_PRCTL, PR_SET_KEEPCAPS, int(bool(securebits & SECBIT_KEEP_CAPS)))
    _capset(prog, caps.get("effective", 0), caps.get("permitted", 0), inh)
