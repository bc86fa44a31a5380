"""A pre-fork server in python3: the demo's built-in workload.

The parent loads a dataset (MIB MiB of bytes plus a dict of small objects),
then forks WORKERS workers that share it copy-on-write and serve requests.
Requests travel through files in DIR (no pipes or sockets, so every cowtree
version can checkpoint it):

    DIR/req-<pid>    "<offset> <length>" or "check"   (written by a client)
    DIR/resp-<pid>   "<served> <blake2b of the slice>"  or "ok <sum>" / "bad <sum>"

DIR/<pid>.sum holds each worker's checksum of the whole dataset, DIR/ready the
pids (parent first) once every worker is serving.  SIGTERM ends a process.
"""

import argparse
import hashlib
import os
import random
import signal
import sys
import time


def load_dataset(mib):
    rng = random.Random(1234)
    blob = b"".join(rng.randbytes(1 << 20) for _ in range(mib))  # page-distinct bytes
    # small objects: python's reference counting makes their pages diverge a little
    index = {i: (str(i) * 3, i * 7) for i in range(50_000)}
    return blob, index


def checksum(blob, index):
    h = hashlib.blake2b(blob, digest_size=16)
    h.update(repr(sorted(index.items())[:1000]).encode())
    return h.hexdigest()


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def serve(directory, blob, index):
    me = os.getpid()
    req = os.path.join(directory, f"req-{me}")
    resp = os.path.join(directory, f"resp-{me}")
    served = 0
    atomic_write(os.path.join(directory, f"{me}.sum"), checksum(blob, index))
    while True:
        try:
            with open(req) as f:
                text = f.read().strip()
        except FileNotFoundError:
            time.sleep(0.02)
            continue
        os.unlink(req)
        if text == "check":
            with open(os.path.join(directory, f"{me}.sum")) as f:
                want = f.read().strip()
            got = checksum(blob, index)
            atomic_write(resp, f"{'ok' if got == want else 'bad'} {got}")
            continue
        offset, length = (int(x) for x in text.split())
        served += 1
        digest = hashlib.blake2b(blob[offset:offset + length], digest_size=8).hexdigest()
        atomic_write(resp, f"{served} {digest} {index[offset % len(index)][1]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    blob, index = load_dataset(args.mib)
    workers = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(args.dir, blob, index)
            finally:
                os._exit(1)
        workers.append(pid)
    while not all(os.path.exists(os.path.join(args.dir, f"{w}.sum")) for w in workers):
        time.sleep(0.02)
    atomic_write(os.path.join(args.dir, "ready"), "\n".join(map(str, [os.getpid()] + workers)) + "\n")
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
