"""A pre-fork server in python3: the demo's built-in workload.

The parent loads a dataset (MIB MiB of bytes plus a dict of small objects),
then forks WORKERS workers that share it copy-on-write.  The parent talks to
each worker over a pair of pipes (requests down, answers up); clients outside
the tree talk to the parent through files in DIR, so that no pipe leaves the
tree:

    DIR/req-<worker pid>    "<offset> <length>" or "check"   (written by a client)
    DIR/resp-<worker pid>   "<served> <digest> <value>"  or  "ok <sum>" / "bad <sum>"

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


def worker(directory, blob, index, requests, answers):
    """Serve requests read from the pipe ``requests``, answer on ``answers``."""
    me = os.getpid()
    total = checksum(blob, index)
    atomic_write(os.path.join(directory, f"{me}.sum"), total)
    served = 0
    for line in requests:  # a blocking read: the dump usually finds the worker here
        text = line.strip()
        if text == "check":
            got = checksum(blob, index)
            answer = f"{'ok' if got == total else 'bad'} {got}"
        else:
            offset, length = (int(x) for x in text.split())
            served += 1
            digest = hashlib.blake2b(blob[offset:offset + length], digest_size=8).hexdigest()
            answer = f"{served} {digest} {index[offset % len(index)][1]}"
        answers.write(answer + "\n")
        answers.flush()
    os._exit(0)


def dispatch(directory, channels):
    """Forward client request files to the workers' pipes, and their answers back."""
    while True:
        idle = True
        for pid, (down, up) in channels.items():
            req = os.path.join(directory, f"req-{pid}")
            try:
                with open(req) as f:
                    text = f.read().strip()
            except FileNotFoundError:
                continue
            os.unlink(req)
            idle = False
            down.write(text + "\n")
            down.flush()
            atomic_write(os.path.join(directory, f"resp-{pid}"), up.readline().strip())
        if idle:
            time.sleep(0.02)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    blob, index = load_dataset(args.mib)
    channels = {}
    for _ in range(args.workers):
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for down, up in channels.values():  # the other workers' parent ends
                down.close()
                up.close()
            os.close(req_w)
            os.close(ans_r)
            try:
                worker(args.dir, blob, index, os.fdopen(req_r, "r"), os.fdopen(ans_w, "w"))
            finally:
                os._exit(1)
        os.close(req_r)
        os.close(ans_w)
        channels[pid] = (os.fdopen(req_w, "w"), os.fdopen(ans_r, "r"))
    while not all(os.path.exists(os.path.join(args.dir, f"{w}.sum")) for w in channels):
        time.sleep(0.02)
    atomic_write(os.path.join(args.dir, "ready"), "\n".join(map(str, [os.getpid()] + list(channels))) + "\n")
    dispatch(args.dir, channels)


if __name__ == "__main__":
    sys.exit(main())
