"""cow-show: print any cowtree stream (images or plan) for people, scripts or golden files.

Three forms:
  default   a readable report: header, process tree, VMA tables with frame runs, page runs
  --json    one JSON document (packed arrays decoded to lists, other binaries summarised)
  --normal  the report with everything that differs between two dumps of the same
            workload masked (pids renumbered, registers, hashes, kernel, temp paths):
            the form compared with tests/golden/
"""

import argparse
import hashlib
import json
import os
import sys
import zlib
from array import array

from stages.stream import StreamError, StreamReader, open_input, os_error_text, silence_broken_pipe, unpack_u32

PROT = {0: "---", 1: "r--", 2: "-w-", 3: "rw-", 4: "--x", 5: "r-x", 6: "-wx", 7: "rwx"}
PAGE = 4096

# Fields holding packed uint32 arrays.
PACKED_U32 = {"frames", "same", "crcs"}
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {9: "\\t", 10: "\\n", 13: "\\r"}


SCHED_POLICIES = {0: "OTHER", 1: "FIFO", 2: "RR", 3: "BATCH", 5: "IDLE", 6: "DEADLINE"}
SCHED_RESET_ON_FORK = 0x40000000


def cpu_list(cpus):
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's list format)."""
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out) or "-"


def sched_text(sched):
    """(policy, priority) -> "batch priority 0 reset_on_fork"."""
    policy, prio = sched
    name = SCHED_POLICIES.get(policy & ~SCHED_RESET_ON_FORK, str(policy & ~SCHED_RESET_ON_FORK))
    return f"{name} priority {prio}" + (" reset_on_fork" if policy & SCHED_RESET_ON_FORK else "")


def frame_runs(ids):
    """Compress a frame-id array into runs: '1-256', '0x12' (12 absent pages), '300'."""
    out = []
    i, n = 0, len(ids)
    while i < n:
        j = i
        if ids[i] == 0:
            while j + 1 < n and ids[j + 1] == 0:
                j += 1
            out.append(f"0x{j - i + 1}")
        else:
            while j + 1 < n and ids[j + 1] == ids[j] + 1:
                j += 1
            out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return " ".join(out)


def summarize_bin(blob):
    return {"bytes": len(blob), "blake2b": hashlib.blake2b(blob, digest_size=8).hexdigest()}


def to_json(value, key=None, kind=None):
    """A record body (of record kind ``kind``) as JSON values: packed integers unpacked,
    other bytes summarized."""
    if isinstance(value, bytes):
        if key in PACKED_U32 or (key == "pages" and kind == "shmem"):  # shmem: the page indexes dumped
            return list(unpack_u32(value, key))
        if key == "pages":  # a plan's write steps: (page, frame) pairs
            arr = unpack_u32(value, key)
            return [[arr[i], arr[i + 1]] for i in range(0, len(arr), 2)]
        return summarize_bin(value)
    if isinstance(value, dict):
        return {str(k): to_json(v, k, kind) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v, key, kind) for v in value]
    return value


class Normalizer:
    """Masks what legitimately differs between two dumps of the same workload."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.pids = {}
        self.root_pid = None

    def pid(self, pid):
        if not self.enabled or not pid:
            return str(pid)
        if pid not in self.pids:
            self.pids[pid] = f"P{len(self.pids) + 1}"
        return self.pids[pid]

    def path(self, path):
        if path is None:
            return "-"
        if self.enabled and (path.startswith("/tmp/") or path.startswith("/var/tmp/")):
            return "<tmp>/" + os.path.basename(path)
        return path

    def value(self, text):
        return "*" if self.enabled else text


class Printer:
    def __init__(self, out, normal):
        self.out = out
        self.norm = Normalizer(normal)

    def line(self, text=""):
        # one line per thing shown, whatever a path holds (a newline, a carriage return...)
        self.out.write(text.translate(CONTROL_ESCAPES) + "\n")

    # -- header and trailer -------------------------------------------------
    def header(self, h):
        self.line(f"{h['format']} version {h['version']}")
        self.line(f"  kernel {self.norm.value(h['kernel'])}  arch {h['arch']}  page size {h['page_size']}")
        self.norm.root_pid = h["root_pid"]
        self.line(f"  root pid {self.norm.pid(h['root_pid'])}")
        vdso = h["vdso"]
        layout = ", ".join(f"{name} {start:#x}-{end:#x}" for name, start, end in vdso["layout"])
        self.line(f"  vdso {layout or '-'}  sha256 {self.norm.value(vdso['sha256'][:16])}")
        if "strategy" in h:
            self.line(f"  strategy {h['strategy']}")
            w = h["window"]
            self.line(f"  window base hint {w['base_hint']:#x} size {w['size']:#x}")
            for key in sorted(h["stats"]):
                self.line(f"  stat {key} = {h['stats'][key]}")

    def trailer(self, t, stats):
        counts = " ".join(f"{k}={v}" for k, v in sorted(t["counts"].items()))
        self.line(f"trailer: {t['records']} records ({counts})")
        if "summary" in t:
            for key in sorted(t["summary"]):
                self.line(f"  {key} = {t['summary'][key]}")
        if stats["pages_records"]:
            self.line(
                f"pages: {stats['pages_records']} runs, {stats['frames']} frames, "
                f"{stats['stored']} stored, {stats['same']} equal to an earlier frame"
            )
        if stats["crc_checked"]:
            self.line(f"page crcs: {stats['crc_checked']} checked, {stats['crc_bad']} wrong"
                      + (f" (first: frame {stats['crc_first_bad']})" if stats["crc_bad"] else ""))
        for oid, (kind, size, name, pages) in sorted(stats.get("shmem", {}).items()):
            what = {"memfd": f"memfd {name!r}", "tmpfile": f"deleted tmpfs file {self.norm.path(name)}"}.get(kind, kind)
            self.line(f"shared memory {oid}: {what}, {size} bytes, {pages} pages dumped")

    # -- images -------------------------------------------------------------
    def process(self, p, indent="", ppid_field="ppid"):
        n = self.norm
        # the root's parent is outside the tree: its pid means nothing after a restore
        ppid = "-" if (n.enabled and p["pid"] == n.root_pid) else n.pid(p[ppid_field])
        self.line(
            f"{indent}process {n.pid(p['pid'])} ppid {ppid} pgid {n.pid(p['pgid'])} "
            f"sid {n.pid(p['sid'])} comm {p['comm']} exe {n.path(p.get('exe'))}"
        )
        for t in p["threads"]:
            self.line(
                f"{indent}  thread {n.pid(t['tid'])} regs {n.value(summarize_bin(t['regs'])['blake2b'])} "
                f"xstate {len(t['xstate'])} bytes sigmask {t['sigmask']:#x}"
            )
            if not self.norm.enabled and ("sigaltstack" in t or t.get("pending")):
                sp, flags, size = t.get("sigaltstack") or (0, 2, 0)
                alt = "none" if flags & 2 else f"{sp:#x}+{size:#x} flags {flags:#x}"
                self.line(f"{indent}    sigaltstack {alt}  pending "
                          f"{' '.join(str(int.from_bytes(i[:4], 'little')) for i in t.get('pending', ())) or 'none'}")
            if not self.norm.enabled and ("tid_address" in t or "robust_list" in t or "rseq" in t):
                head, length = t.get("robust_list") or (0, 0)
                rseq = t.get("rseq")
                named = f"  comm {t['comm']} nice {t.get('nice', 0)}" if "comm" in t else ""
                if "sched" in t:
                    named += f" sched {sched_text(t['sched'])} cpus {cpu_list(t.get('affinity', ()))}"
                self.line(f"{indent}    tid address {t.get('tid_address', 0):#x}  robust list {head:#x}+{length}{named}  rseq "
                          + (f"{rseq['addr']:#x}+{rseq['len']} sig {rseq['sig']:#x}" if rseq else "none"))
        if not self.norm.enabled:
            mm = p["mm"]
            self.line(
                f"{indent}  mm code {mm['start_code']:#x}-{mm['end_code']:#x} data {mm['start_data']:#x}-"
                f"{mm['end_data']:#x} brk {mm['start_brk']:#x}-{mm['brk']:#x} stack {mm['start_stack']:#x}"
            )
        changed = [
            f"{i + 1}:{'ign' if a[0] == 1 else 'handler' if a[0] else 'dfl'}"
            for i, a in enumerate(p["sigactions"])
            if a[0] != 0
        ]
        self.line(f"{indent}  sigactions {' '.join(changed) or 'all default'}")
        for fd in p["fds"]:
            if fd["kind"] == "pipe":  # the inode differs between dumps: the ids say what is shared
                self.line(f"{indent}  fd {fd['fd']} pipe {fd.get('pipe')} {'read' if fd['flags'] & 3 == 0 else 'write'} "
                          f"end, description {fd.get('desc')} flags {fd['flags']:#o}")
                continue
            if fd["kind"] == "fifo" and "desc" in fd:
                end = ("read", "write", "read-write", "?")[fd["flags"] & 3]
                self.line(f"{indent}  fd {fd['fd']} fifo {n.path(fd.get('path'))} pipe {fd.get('pipe')} {end} end, "
                          f"description {fd.get('desc')} flags {fd['flags']:#o}")
                continue
            locks = ", ".join(f"{kind} {how} {start}-{'EOF' if end is None else end}"
                              for kind, how, start, end in fd.get("locks", ()))
            self.line(f"{indent}  fd {fd['fd']} {fd['kind']} {n.path(fd.get('path'))} flags {fd['flags']:#o}"
                      + (f" pos {fd['pos']}" if fd["kind"] == "dir" and not n.enabled else "")
                      + (f" locks {locks}" if locks else "")
                      + (f" description {fd['desc']}" if "desc" in fd else "")
                      + (f" shared memory {fd['shmem']}" if "shmem" in fd else ""))
        for pipe in p.get("pipes", ()):
            fifo = f" (FIFO {n.path(pipe['path'])})" if "path" in pipe else ""
            self.line(f"{indent}  pipe {pipe['id']}{fifo}: capacity {pipe['size']}, {len(pipe['data'])} bytes unread"
                      + (f" {pipe['data'][:16]!r}" if pipe["data"] else ""))
        st = p.get("state")
        if st and not self.norm.enabled:  # not in the normal form: golden files predate it
            self.line(f"{indent}  creds uids {st.get('uids')} gids {st.get('gids')} groups {st.get('groups')}")
            self.line(f"{indent}  nice {st.get('nice')} personality {st.get('personality', 0):#x} "
                      f"subreaper {int(st.get('subreaper', 0))} pdeathsig {st.get('pdeathsig')} "
                      f"dumpable {st.get('dumpable')} no_new_privs {int(st.get('no_new_privs', 0))}")
            inf = (1 << 64) - 1
            lims = " ".join(f"{i}:{'inf' if a == inf else a}/{'inf' if b == inf else b}"
                            for i, (a, b) in enumerate(st.get("rlimits", ())))
            self.line(f"{indent}  rlimits {lims}")
            caps = st.get("caps")
            if caps:
                self.line(f"{indent}  caps " + " ".join(f"{k[:3]} {caps[k]:#x}" for k in
                                                          ("effective", "permitted", "inheritable", "bounding", "ambient") if k in caps)
                          + f" securebits {st.get('securebits', 0):#x}")
            for t in st.get("posix_timers", ()):
                how = {0: f"signal {t['signo']}", 1: "no signal", 4: f"signal {t['signo']} to the thread"}.get(t["notify"], "?")
                iv_s, iv_ns, v_s, v_ns = t["value"]
                when = f"in {v_s}.{v_ns:09d}s every {iv_s}.{iv_ns:09d}s" if v_s or v_ns else "disarmed"
                self.line(f"{indent}  posix timer {t['id']} clock {t['clock']} {how} value {t['sival']:#x} {when}")
            if "sched" in st or "oom_score_adj" in st:
                self.line(f"{indent}  sched {sched_text(st.get('sched', (0, 0)))} cpus {cpu_list(st.get('affinity', ()))} "
                          f"oom_score_adj {st.get('oom_score_adj')}")
            armed = [f"{w}:{t[2]}.{t[3]:06d}s/{t[0]}.{t[1]:06d}s" for w, t in zip(("real", "virtual", "prof"), st.get("itimers", ())) if t[2] or t[3]]
            self.line(f"{indent}  itimers {' '.join(armed) or 'none'}  pending (shared) "
                      f"{' '.join(str(int.from_bytes(i[:4], 'little')) for i in st.get('pending', ())) or 'none'}")
            if st.get("stopped"):
                self.line(f"{indent}  stopped (state T when dumped: restored stopped)")
        for key in ("cwd", "root", "umask"):
            if key in p:
                self.line(f"{indent}  {key} {n.path(p[key]) if key != 'umask' else oct(p[key])}")

    def vma_line(self, v):
        npages = (v["end"] - v["start"]) // PAGE
        flags = ",".join(v["vmflags"]) if not self.norm.enabled else ",".join(
            f for f in v["vmflags"] if f not in ("ac", "sd", "um", "uw")
        )
        text = (
            f"  {v['start']:#014x}-{v['end']:#014x} {PROT[v['prot']]}{'s' if v['shared'] else 'p'} "
            f"{v['kind']:<6} {npages:>6}p off {v['pgoff']:#x} {self.norm.path(v.get('path'))} [{flags}]"
        ) + (f" shared memory {v['shmem']}" if "shmem" in v else "")
        self.line(text)
        if v.get("frames") is not None:
            ids = unpack_u32(v["frames"], "frames")
            present = sum(1 for x in ids if x)
            self.line(f"      frames ({present} present): {frame_runs(ids)}")

    def vmas(self, body):
        self.line(f"vmas of {self.norm.pid(body['pid'])}: {len(body['vmas'])}")
        for v in body["vmas"]:
            self.vma_line(v)

    # -- plans --------------------------------------------------------------
    def plan_process(self, body):
        n = self.norm
        img = body["image"]
        self.line(f"plan for {n.pid(body['pid'])} (restored ppid {n.pid(body['ppid'])})")
        self.process(img, indent="  ")
        for r in body["ranges"]:
            src = "anon" if r["backing"] == "anon" else f"file {n.path(r.get('path'))} @ {r.get('pgoff', 0):#x}"
            self.line(f"  range {r['id']} at +{r['offset']:#x} size {r['size'] // PAGE}p {src}")
        for s in body["steps"]:
            if s["op"] == "write":
                pairs = unpack_u32(s["pages"], "pages")
                self.line(f"  step write range {s['range']}: {len(pairs) // 2} pages")
            elif s["op"] == "fork":
                self.line(f"  step fork {n.pid(s['pid'])}")
            else:
                self.line(f"  step drop range {s['range']}")
        for v in body["layout"]:
            self.vma_line(dict(v, frames=None))
            for r, rp, count, vp in v["pieces"]:
                self.line(f"      piece range {r} page {rp} x{count} -> vma page {vp}")


def _check_crcs(first, same, crcs, data, frame_crcs, stats):
    """Each stored page's bytes against its crc; a frame "same" as another has that one's crc."""
    if len(frame_crcs) != first:  # runs out of order (the plan refuses such images): realign
        del frame_crcs[first:]
        frame_crcs.extend([0] * (first - len(frame_crcs)))
    offset = 0
    for i, (s, crc) in enumerate(zip(same, crcs)):
        if s:
            good = s < len(frame_crcs) and frame_crcs[s] == crc
        else:
            good = zlib.crc32(data[offset:offset + PAGE]) == crc
            offset += PAGE
        frame_crcs.append(crc)
        stats["crc_checked"] += 1
        if not good:
            stats["crc_bad"] += 1
            stats.setdefault("crc_first_bad", first + i)


def show(stream, out, normal=False, as_json=False):
    """Print the stream to out; returns the page statistics (``crc_bad``: pages whose bytes
    do not match their crc, which the caller reports as a bad stream)."""
    reader = StreamReader(stream)
    stats = {"pages_records": 0, "frames": 0, "stored": 0, "same": 0, "crc_checked": 0, "crc_bad": 0}
    frame_crcs = array("I", [0])  # frame id -> its crc from the stream (crcs records only)
    if as_json:
        doc = {"header": to_json(reader.header), "records": []}
        for rec in reader:
            entry = {"kind": rec.kind, "body": to_json(rec.body, kind=rec.kind)}
            if rec.data is not None:
                entry["data"] = summarize_bin(rec.data)
            doc["records"].append(entry)
            if rec.kind == "pages" and "crcs" in rec.body:
                _check_crcs(rec.body["first"], unpack_u32(rec.body["same"], "same"),
                            unpack_u32(rec.body["crcs"], "crcs"), rec.data, frame_crcs, stats)
        doc["trailer"] = reader.trailer
        json.dump(doc, out, indent=1, sort_keys=True)
        out.write("\n")
        return stats
    pr = Printer(out, normal)
    pr.header(reader.header)
    for rec in reader:
        if rec.kind == "process" and "image" in rec.body:
            pr.plan_process(rec.body)
        elif rec.kind == "process":
            pr.process(rec.body)
        elif rec.kind == "vmas":
            pr.vmas(rec.body)
        elif rec.kind == "pages":
            same = unpack_u32(rec.body["same"], "same")
            stats["pages_records"] += 1
            stats["frames"] += rec.body["count"]
            stats["same"] += sum(1 for s in same if s)
            stats["stored"] += sum(1 for s in same if not s)
            if "crcs" in rec.body:
                _check_crcs(rec.body["first"], same, unpack_u32(rec.body["crcs"], "crcs"), rec.data,
                            frame_crcs, stats)
        elif rec.kind == "shmem":
            b = rec.body
            obj = stats.setdefault("shmem", {}).setdefault(b["id"], [b["kind"], b["size"], b.get("name"), 0])
            obj[3] += len(b["pages"]) // 4
    pr.trailer(reader.trailer, stats)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="cow-show",
        description="Print a cowtree stream (images from cow-collect, or a plan from cow-plan). "
        "Every record is checked (checksums, order, schema); a bad stream exits 1.",
        epilog="exit codes: 0 shown, 1 bad stream (also: a page whose bytes do not match its crc) "
        "or unreadable file, 130 interrupted.",
    )
    ap.add_argument("file", nargs="?", default="-", help="stream file (default: standard input)")
    form = ap.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    form.add_argument(
        "--normal", action="store_true",
        help="normal form for golden files: pids renumbered, registers, hashes and temp paths masked",
    )
    args = ap.parse_args(argv)
    try:
        with open_input(args.file) as stream:
            stats = show(stream, sys.stdout, normal=args.normal, as_json=args.json)
    except KeyboardInterrupt:
        return 130
    except StreamError as exc:
        sys.stdout.flush()
        print(f"cow-show: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # a reader such as head has seen enough: not an error
        silence_broken_pipe(sys.stdout)
        return 0
    except OSError as exc:
        print(f"cow-show: {os_error_text(exc)}", file=sys.stderr)
        return 1
    if stats["crc_bad"]:
        print(f"cow-show: {stats['crc_bad']} of {stats['crc_checked']} pages do not match their crc "
              f"(first: frame {stats['crc_first_bad']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
