"""Reading and writing another process's memory through /proc/PID/mem (and address_of: where a
buffer of this process is).

/proc/PID/mem reads with FOLL_FORCE: it also reads pages a VMA maps without
PROT_READ (PROT_NONE, execute-only), which process_vm_readv refuses.  And
process_vm_readv pins the pages it reads (FOLL_PIN), which makes the kernel unshare
a copy-on-write anonymous page first: reading a tree with it would double the
memory the tree uses (seen on 6.18: 1093 distinct frames became 2133).
"""

import os

from stages._native import ffi


def address_of(buffer):
    """The address in this process of a writable buffer (an mmap.mmap), through cffi: ctypes'
    import would cost every cow-* command ~2 ms of its start."""
    view = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", view))
    finally:
        ffi.release(view)  # the buffer export: the map can be closed


class ProcessMemory:
    def __init__(self, pid, write=False):
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/mem", (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)

    def read(self, addr, length):
        """Exactly length bytes at addr (OSError on a short read)."""
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), addr + len(out))
            if not chunk:
                raise OSError(f"process {self.pid}: cannot read memory at {addr + len(out):#x}")
            out += chunk
        return bytes(out)

    def read_into(self, addr, view):
        """Fill view (a writable memoryview) with the bytes at addr: no intermediate copy."""
        done, length = 0, len(view)
        while done < length:
            n = os.preadv(self.fd, [view[done:]], addr + done)
            if n <= 0:
                raise OSError(f"process {self.pid}: cannot read memory at {addr + done:#x}")
            done += n

    def write(self, addr, data):
        done = 0
        while done < len(data):
            n = os.pwrite(self.fd, data[done:], addr + done)
            if n <= 0:
                raise OSError(f"process {self.pid}: cannot write memory at {addr + done:#x}")
            done += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
