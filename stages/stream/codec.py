"""Reading and writing whole streams: header first, trailer last, every record checked."""

import errno
import mmap
import os
import stat

import msgpack

from . import compact, envelope, images, plans
from .errors import StreamError
from .schema import Int, Map, MapOf, Str

FORMATS = {images.FORMAT: images, plans.FORMAT: plans}

TRAILER = Map(
    {"records": Int(1), "counts": MapOf(Str(max_len=64), Int(0)), "chain": Int(0, (1 << 32) - 1)},
    {"summary": MapOf(Str(max_len=64), Int())},
)


class Record:
    """One checked record.  ``data_offset``: where ``data`` starts in the input file, when the
    input is a regular file (a reader may then use the payload in place, or read it again
    with reread_data), else None.  ``crc``: the record's checksum."""

    __slots__ = ("kind", "seq", "body", "data", "meta", "data_offset", "crc")

    def __init__(self, kind, seq, body, data, meta, data_offset=None, crc=None):
        self.kind, self.seq, self.body, self.data, self.meta = kind, seq, body, data, meta
        self.data_offset, self.crc = data_offset, crc

    def __repr__(self):
        return f"<Record {self.seq} {self.kind}>"


def _schema_module(header_body, seq=0):
    fmt = header_body.get("format")
    module = FORMATS.get(fmt)
    if module is None:
        raise StreamError(f"record {seq}: unknown stream format {fmt!r} (expected one of {sorted(FORMATS)})")
    version = header_body.get("version")
    if not isinstance(version, int):
        raise StreamError(f"record {seq}: header has no format version")
    if version > module.VERSION:
        raise StreamError(
            f"stream format {fmt} version {version} is newer than this cowtree understands "
            f"(version {module.VERSION}): upgrade cowtree to read it"
        )
    if version < module.VERSION:
        raise StreamError(
            f"stream format {fmt} version {version} is older than this cowtree reads "
            f"(version {module.VERSION}): re-create it with a matching cowtree"
        )
    return module


class StreamWriter:
    """Writes one stream.  ``close()`` writes the trailer; a stream without it is invalid."""

    def __init__(self, fileobj, fmt, header, validate=True):
        self.out = fileobj
        self.module = FORMATS[fmt]
        self.validate = validate
        self.seq = 0
        self.chain = 0
        self.counts = {}
        self.phase = -1
        self.bytes_written = 0
        body = dict(header, format=fmt, version=self.module.VERSION)
        self.write("header", body)

    def write(self, kind, body, data=None, data_crc=None):
        if self.validate:
            spec = self.module.BODIES.get(kind)
            if spec is None:
                raise StreamError(f"cannot write record of unknown kind {kind!r}")
            spec.check(body, f"{kind} record")
        self.write_encoded(kind, envelope.pack_meta_parts(body), data, data_crc)

    def write_encoded(self, kind, meta, data=None, data_crc=None):
        """Write a record whose body is already msgpack-encoded (pass-through of pages; or
        a list of byte strings that join to it).
        ``data_crc``: envelope.data_crc(data), when the caller computed it already."""
        phase = self.module.PHASES.get(kind)
        if phase is None:
            raise StreamError(f"cannot write record of unknown kind {kind!r}")
        if phase < self.phase:
            raise StreamError(f"record {kind!r} written out of order")
        if (data is not None) != (kind in self.module.DATA_KINDS):
            raise StreamError(f"record {kind!r}: data payload present/absent wrongly")
        self.phase = phase
        parts, crc = envelope.encode_record(kind, self.seq, meta, data, data_crc)
        for part in parts:
            self.out.write(part)
            self.bytes_written += len(part)
        self.chain = envelope.chain_update(self.chain, crc)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.seq += 1

    def close(self, summary=None):
        body = {"records": self.seq, "counts": dict(self.counts), "chain": self.chain}
        if summary:
            body["summary"] = summary
        meta = envelope.pack_meta(body)
        parts, _ = envelope.encode_record("trailer", self.seq, meta, None)
        for part in parts:
            self.out.write(part)
            self.bytes_written += len(part)
        self.out.flush()


class StreamReader:
    """Iterates the records of a stream, checking envelope, order and schema of each.

    The trailer is checked when it is reached; iteration ends there and any
    bytes after it are an error.  ``header`` is available after construction.

    ``in_place``: when fileobj is a regular file, it is mapped (``map``, read-only) and
    records are framed in the mapping: ``data`` is a memoryview of the mapping, nothing
    is copied.  A memoryview of ``map`` must be released before it is closed.
    """

    def __init__(self, fileobj, expect=None, validate=True, in_place=False, compact=False):
        self.fileobj = fileobj
        # compact: the VMAs of images vmas records, and the layout, ranges and steps of plan
        # process records, as stages.stream.compact bodies (decoded one at a time), not dicts.
        # A subclass of compact.VmaBody: the class of the images' VMA bodies.
        self.compact = compact
        self.strings = {}  # strings and flag lists shared by the compact bodies
        self.base = _regular_file_offset(fileobj)  # None unless fileobj is a regular file
        self.mapped = _MappedRecords(fileobj, self.base) if in_place and self.base is not None else None
        self.map = self.mapped.map if self.mapped is not None else None
        self.unpacker = envelope.make_unpacker(fileobj) if self.mapped is None else None
        self._data_offset = None
        self.validate = validate
        self.seq = 0
        self.chain = 0
        self.counts = {}
        self.phase = 0
        self.trailer = None
        self.done = False
        first = self._next_raw()
        if first is None:
            raise StreamError("stream is empty or truncated before its header")
        kind, meta, data, crc = first
        if kind != "header":
            raise StreamError(f"record 0 is {kind!r}, expected the header")
        body = envelope.unpack_meta(meta, kind, 0)
        self.module = _schema_module(body)
        self.format = body["format"]
        if expect is not None and self.format not in ([expect] if isinstance(expect, str) else expect):
            raise StreamError(f"this is a {self.format} stream, expected {expect}")
        self.module.HEADER.check(body, "header")
        self.header = body
        self._account(kind, crc)

    def _next_raw(self):
        if self.mapped is not None:
            raw = self.mapped.next(self.seq)
            if raw is None:
                return None
            obj, self._data_offset = raw
            return envelope.check_envelope(obj, self.seq)
        try:
            obj = self.unpacker.unpack()
        except msgpack.OutOfData:
            return None
        except StreamError:
            raise
        except Exception as exc:
            raise StreamError(f"record {self.seq}: undecodable bytes ({exc.__class__.__name__}: {exc})")
        return envelope.check_envelope(obj, self.seq)

    def _account(self, kind, crc):
        self.chain = envelope.chain_update(self.chain, crc)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.seq += 1

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        seq = self.seq
        raw = self._next_raw()
        if raw is None:
            raise StreamError(f"stream is truncated after record {seq - 1}: no trailer")
        kind, meta, data, crc = raw
        if kind == "trailer":
            self._finish(meta)
            raise StopIteration
        spec = self.module.BODIES.get(kind)
        if spec is None or kind == "header":
            raise StreamError(f"record {seq}: unexpected record kind {kind!r} in a {self.format} stream")
        phase = self.module.PHASES[kind]
        if phase < self.phase:
            raise StreamError(f"record {seq} ({kind}): out of order")
        self.phase = phase
        if (data is not None) != (kind in self.module.DATA_KINDS):
            raise StreamError(f"record {seq} ({kind}): data payload present/absent wrongly")
        lists = compact.COMPACT_LISTS.get((self.format, kind)) if self.compact else None
        if lists is not None:
            if isinstance(self.compact, type) and "vmas" in lists:
                lists = {"vmas": self.compact}
            body = compact.unpack_compact(meta, kind, seq, spec if self.validate else None, self.strings, lists)
        else:
            body = envelope.unpack_meta(meta, kind, seq)
            if self.validate:
                spec.check(body, f"record {seq} ({kind})")
        self._account(kind, crc)
        offset = None
        if data is not None and self.mapped is not None:
            offset = self._data_offset
        elif data is not None and self.base is not None:
            # the payload is the last bytes of the record but the crc that follows it
            offset = self.base + self.unpacker.tell() - envelope.packed_crc_len(crc) - len(data)
        return Record(kind, seq, body, data, meta, offset, crc)

    def _finish(self, meta):
        body = envelope.unpack_meta(meta, "trailer", self.seq)
        TRAILER.check(body, f"record {self.seq} (trailer)")
        if body["records"] != self.seq:
            raise StreamError(f"trailer counts {body['records']} records, the stream has {self.seq}")
        if body["counts"] != self.counts:
            raise StreamError(f"trailer counts {body['counts']}, the stream has {self.counts}")
        if body["chain"] != self.chain:
            raise StreamError("trailer chain checksum does not match the records: the stream is corrupted")
        self.trailer = body
        self.done = True
        if (self.mapped.bytes_left() if self.mapped is not None else self.unpacker.read_bytes(1)):
            raise StreamError("bytes after the trailer: the stream is corrupted or two streams were joined")

    def records(self):
        return list(self)


class _MappedRecords:
    """The records of a regular file, framed in a read-only mapping of it (populated at once:
    every page is read anyway).  A framing error is raised when the reader reaches it."""

    def __init__(self, fileobj, base):
        fd = fileobj.fileno()
        self.size = os.fstat(fd).st_size
        self.map = b""
        if self.size:
            self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                 prot=mmap.PROT_READ)
        self.pos = base

    def next(self, seq):
        """Record seq as the unpacker would give it ([kind, seq, meta, data, crc]; data a
        memoryview of the map) and where its data starts; None at the end of the file."""
        if self.pos >= self.size:
            return None
        try:
            kind, rseq, (mstart, mlen), data, crc, end = envelope.split_record(self.map, self.pos, seq)
        except envelope.Truncated:
            return None  # the reader reports the truncation
        self.pos = end
        offset = None
        if data is not None:
            offset = data[0]
            data = memoryview(self.map)[data[0]:data[0] + data[1]]
        return [kind, rseq, bytes(self.map[mstart:mstart + mlen]), data, crc], offset

    def bytes_left(self):
        return self.size - self.pos


def reread_data(fd, kind, seq, meta, offset, length, crc):
    """The payload of a record read before from the regular file fd (Record's data_offset, crc
    and meta), read again and checked: StreamError if the file has changed since."""
    data = bytearray()
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    if len(data) != length or envelope.record_crc(kind, seq, meta, data) != crc:
        raise StreamError(f"record {seq} ({kind}): the input file has changed since it was read")
    return data


def _regular_file_offset(fileobj):
    try:
        if not stat.S_ISREG(os.fstat(fileobj.fileno()).st_mode):
            return None
        return fileobj.tell()
    except (AttributeError, OSError, ValueError):
        return None


def open_input(path):
    """A binary file object for ``path`` or stdin ('-' or None)."""
    if path in (None, "-"):
        return os.fdopen(os.dup(0), "rb", buffering=1 << 20)
    return open(path, "rb", buffering=1 << 20)


# Smaller than a full pages payload (1 MiB): a write bigger than the buffer goes to the file
# from the caller's memory, one that fits is first copied into the buffer.
WRITE_BUFFER = 1 << 16


class OutputFile:
    """A stream destination: stdout, or a file that gets its name only once committed.

    A new name or a regular file is written under no name in its directory (O_TMPFILE)
    and linked into place by commit(), replacing what was there: a run that fails leaves
    an existing file as it was, and ``cow-plan -i F -o F`` reads F to the end before F is
    replaced.  Anything else that exists (a FIFO, a device such as /dev/null) is written
    in place and never replaced.  A symlink stays: the file it points to is replaced.
    Images and plans contain process memory, so a file we create is private to the owner (0600).
    """

    def __init__(self, path):
        self.path = None if path in (None, "-") else path
        self._target = None if self.path is None else os.path.realpath(self.path)  # what is replaced
        self._temp_name = None  # the temporary name, once the file has one
        self._unnamed = False  # written under no name: commit() links it into place
        if self.path is None:
            self.file = os.fdopen(os.dup(1), "wb", buffering=WRITE_BUFFER)
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # a FIFO or device: no mode change either
        else:
            fd = self._open_new()
        self.file = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)

    def _claim_temp_name(self, make):
        """make(name) for hidden names beside the target (.NAME.PID-N.tmp) until one is free
        (make raises FileExistsError for a taken one); returns what make returned."""
        where, base = os.path.split(self._target)
        for n in range(100):
            name = os.path.join(where, f".{base}.{os.getpid()}-{n}.tmp")
            try:
                made = make(name)
            except FileExistsError:
                continue
            self._temp_name = name
            return made
        raise FileExistsError(errno.EEXIST, "no free temporary name", self.path)

    def _open_new(self):
        try:
            fd = os.open(os.path.dirname(self._target), os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
            self._unnamed = True
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise OSError(exc.errno, exc.strerror, self.path) from None
        # a file system without O_TMPFILE: a hidden temporary name, renamed at commit
        return self._claim_temp_name(
            lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))

    def commit(self):
        """Write what is buffered and put the file in place (its name replaced at once).
        Not synced: like any write, the image reaches the disk when the kernel writes it."""
        self.file.flush()
        if self._unnamed:
            self._link_temp_name()
        if self._temp_name is not None:
            os.rename(self._temp_name, self._target)
            self._temp_name = None
        self.file.close()

    def _link_temp_name(self):
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: how an O_TMPFILE file gets a name without
        # CAP_DAC_READ_SEARCH.  os.link passes AT_SYMLINK_FOLLOW only when given a dir fd.
        fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._claim_temp_name(
                lambda name: os.link(str(self.file.fileno()), name, src_dir_fd=fds, follow_symlinks=True))
        finally:
            os.close(fds)
        self._unnamed = False

    def abandon(self):
        """Close without putting anything in place: an unnamed file vanishes, a temporary
        name is removed, an existing file at path is left as it was.  On a pipe the
        missing trailer marks the stream invalid."""
        try:
            self.file.close()
        except OSError:
            pass
        if self._temp_name is not None:
            try:
                os.unlink(self._temp_name)
            except OSError:
                pass
            self._temp_name = None


def os_error_text(exc):
    """An OSError as a command prints it: "PATH: reason" (the way cat does), not Python's
    "[Errno 2] No such file or directory: 'PATH'"."""
    if exc.strerror and exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror}"
    return exc.strerror or str(exc)


def is_broken_pipe(exc):
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def silence_broken_pipe(stream):
    """After a reader of stream (stdout, a pipe) went away (head has seen enough): point its
    fd at /dev/null, so that the interpreter's last flush does not fail again at exit."""
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, stream.fileno())
    os.close(fd)
