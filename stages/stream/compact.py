"""Compact record bodies: a process with 20,000 VMAs must not cost 20,000 dicts.

A VMA body (an entry of an images ``vmas`` record, or of a plan's ``layout``) is a
read-mostly mapping of a dozen fields.  As a dict it costs about 300 bytes, and a
layout entry copied from it as many again; here it is a slotted object (one
pointer per field) that behaves like the dict (``v["start"]``, ``v.get("dev")``,
``dict(v)``, equality, assignment) and packs to the same bytes: its keys keep the
order they had on the wire (``dict(v)`` is the dict msgpack would have made).

PlanRange and PlanStep do the same for the ranges and steps of a plan process record
(20,000 of each in that process); LayoutBody is a layout entry as cow-apply reads it.
``LayoutVma`` is a layout entry as cow-plan makes it: an image VMA body plus its
``pieces``, sharing the body's fields instead of copying them.

``unpack_compact`` decodes a ``vmas`` record (or a plan's process record) one item at a
time (checking each against the schema), so the record never exists as 20,000 dicts at
once either.  StreamReader(compact=...) uses it; the writer packs these bodies as the
dicts they stand for (``plain``), and the schema checks them the same way (``as_dict``).
"""

import io
from collections.abc import MutableMapping
from operator import attrgetter

import msgpack

from . import images, plans

_VMA_FIELDS = frozenset(images.VMA.required) | frozenset(images.VMA.optional)
_KEY_ORDERS = {}  # one tuple object per key order seen (all VMAs share a handful)
_GETTERS = {}  # (class, key order) -> attrgetter of those keys (None: some are not slots)


def _key_order(keys):
    keys = tuple(keys)
    return _KEY_ORDERS.setdefault(keys, keys)


class Compact(MutableMapping):
    """A record body in slots (one per field of its schema); absent fields are unset
    slots.  ``_keys``: the present keys in order (shared tuple), as a dict keeps them.
    Fields most bodies lack (RARE: a file's dev and ino, ...) are kept in the dict
    ``_more`` instead of a slot each."""

    __slots__ = ("_keys",)
    FIELDS = frozenset()
    SLOTTED = frozenset()  # FIELDS but the rare ones

    def __init__(self, **fields):
        for key, value in fields.items():
            self._put(key, value)
        self._keys = _key_order(fields)

    @classmethod
    def from_dict(cls, body):
        """The compact form of a dict whose keys are fields of cls (checked by the caller)."""
        self = cls.__new__(cls)
        for key, value in body.items():
            self._put(key, value)
        self._keys = _key_order(body)
        return self

    def _put(self, key, value):
        if key in self.SLOTTED:
            setattr(self, key, value)
            return
        more = getattr(self, "_more", None)
        if more is None:
            self._more = more = {}
        more[key] = value

    def __getitem__(self, key):
        if key in self._keys:
            return getattr(self, key) if key in self.SLOTTED else self._more[key]
        raise KeyError(key)

    def __contains__(self, key):
        return key in self._keys

    def __setitem__(self, key, value):
        if key not in self.FIELDS:
            raise KeyError(f"{key!r} is not a field of {type(self).__name__}")
        if key not in self._keys:
            self._keys = _key_order(self._keys + (key,))
        self._put(key, value)

    def __delitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        if key in self.SLOTTED:
            delattr(self, key)
        else:
            del self._more[key]
        self._keys = _key_order(k for k in self._keys if k != key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def items(self):
        keys = self._keys
        getter = _GETTERS.get((type(self), keys), False)
        if getter is False:
            slotted = self.SLOTTED
            getter = _GETTERS[(type(self), keys)] = \
                attrgetter(*keys) if len(keys) > 1 and slotted.issuperset(keys) else None
        if getter is not None:
            return list(zip(keys, getter(self)))  # in C: the packer and the checker call this per body
        slotted = self.SLOTTED
        return [(key, getattr(self, key) if key in slotted else self._more[key]) for key in keys]

    def as_dict(self):
        """The dict this body stands for (what msgpack packs, what the schema checks)."""
        return dict(self.items())

    def __repr__(self):
        return f"{type(self).__name__}({dict(self.items())!r})"

    def __copy__(self):
        return type(self).from_dict(self)


def _compact_class(name, spec, doc, rare=()):
    fields = tuple(spec.required) + tuple(spec.optional)
    slotted = tuple(f for f in fields if f not in rare)
    return type(name, (Compact,), {"__slots__": slotted + (("_more",) if rare else ()),
                                   "FIELDS": frozenset(fields), "SLOTTED": frozenset(slotted),
                                   "__doc__": doc, "__module__": __name__})


VmaBody = _compact_class("VmaBody", images.VMA, "A VMA body of an images vmas record.",
                         rare=("dev", "ino", "size", "mtime", "shmem"))
PlanRange = _compact_class("PlanRange", plans.RANGE, "A staging range of a plan process record.",
                           rare=("path", "pgoff", "dev", "ino"))
PlanStep = _compact_class("PlanStep", plans.STEP, "A step of a plan process record.")


class LayoutVma(MutableMapping):
    """A plan layout entry: the fields of an image VMA body (shared, not copied) plus
    ``pieces``.  Assigning a field keeps the change in this entry only.  The pieces may be
    given flat, a tuple (range, range page, count, VMA page, range, ...): ``v["pieces"]`` is
    then a new list of 4-item lists each time (a list of lists kept per VMA costs 150 bytes);
    pieces assigned as a list are kept as they are."""

    __slots__ = ("_base", "_pieces", "_own")

    def __init__(self, base, pieces):
        self._base, self._pieces, self._own = base, pieces, None

    @property
    def pieces(self):
        p = self._pieces
        if type(p) is tuple:
            return [list(p[i:i + 4]) for i in range(0, len(p), 4)]
        return p

    def __getitem__(self, key):
        if key == "pieces":
            return self.pieces
        own = self._own
        if own is not None and key in own:
            return own[key]
        return self._base[key]

    def __contains__(self, key):
        return key == "pieces" or key in self._base or (self._own is not None and key in self._own)

    def __setitem__(self, key, value):
        if key == "pieces":
            self._pieces = value
            return
        if self._own is None:
            self._own = VmaBody.from_dict(self._base)  # copy on first write: the base is shared
        self._own[key] = value

    def __delitem__(self, key):
        if key == "pieces":
            raise KeyError("pieces is required")
        if self._own is None:
            self._own = VmaBody.from_dict(self._base)
        del self._own[key]

    def _fields(self):
        return self._own if self._own is not None else self._base

    def __iter__(self):
        yield from self._fields()
        yield "pieces"

    def __len__(self):
        return len(self._fields()) + 1

    def items(self):
        got = self._fields().items()
        got.append(("pieces", self.pieces))
        return got

    def as_dict(self):
        return dict(self.items())

    def __repr__(self):
        return f"LayoutVma({dict(self.items())!r})"


def plain(obj):
    """msgpack's ``default``: a compact body packs as the dict it stands for."""
    if isinstance(obj, (Compact, LayoutVma)):
        return obj.as_dict()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _shared_strings(body, strings):
    """body (a dict) with its strings and flag list replaced by equal ones seen before:
    msgpack makes new objects each time, and 20,000 VMAs would hold 120,000 copies of
    "rd", "wr", ...  (The flag lists are then shared: read only.)"""
    for key in ("kind", "path", "dev", "op", "backing"):
        value = body.get(key)
        if isinstance(value, str):
            body[key] = strings.setdefault(value, value)
    flags = body.get("vmflags")
    if isinstance(flags, list):
        body["vmflags"] = strings.setdefault(tuple(flags), flags)
    return body


LayoutBody = _compact_class("LayoutBody", plans.LAYOUT_VMA, "A layout entry of a plan process record, as read.",
                            rare=("dev", "ino", "size", "mtime", "shmem"))

# (format, record kind) -> {list field: the compact class of its items}
COMPACT_LISTS = {
    (images.FORMAT, "vmas"): {"vmas": VmaBody},
    (plans.FORMAT, "process"): {"layout": LayoutBody, "ranges": PlanRange, "steps": PlanStep},
}


def unpack_compact(meta, kind, seq, spec, strings, lists):
    """The body of a record whose big lists (``lists``: field -> compact class) hold
    compact bodies, decoded and checked (against ``spec``, None: not checked) one item at
    a time; equal strings and flag lists are one object (``strings``: the reader's table
    of them).  Errors are the ones the whole-record decode and check give."""
    path = f"record {seq} ({kind})"
    try:
        return _unpack_incrementally(meta, path, spec, strings, lists)
    except _Irregular:
        pass
    # not the regular shape: decode it whole for the usual messages (or a dict body the
    # schema accepts after all)
    from .envelope import unpack_meta
    body = unpack_meta(meta, kind, seq)
    if spec is not None:
        spec.check(body, path)
    for key, cls in lists.items():
        items = body.get(key)
        if isinstance(items, list) and all(isinstance(v, dict) and cls.FIELDS.issuperset(v) for v in items):
            body[key] = [cls.from_dict(_shared_strings(v, strings)) for v in items]
    return body


class _Irregular(Exception):
    pass


def _list_spec(spec, key):
    return spec.required.get(key) or spec.optional.get(key)


def _unpack_incrementally(meta, path, spec, strings, lists):
    # read from the record's bytes (BytesIO shares them) in small steps: feed() would copy them
    unpacker = msgpack.Unpacker(io.BytesIO(meta), raw=False, strict_map_key=False, read_size=1 << 16,
                                max_buffer_size=max(len(meta), 1 << 16))
    try:
        nkeys = unpacker.read_map_header()
    except Exception:
        raise _Irregular()
    body = {}
    for _ in range(nkeys):
        try:
            key = unpacker.unpack()
        except Exception:
            raise _Irregular()
        if not isinstance(key, (str, int)) or key in body:
            raise _Irregular()  # a repeated or unhashable key: let the whole-record decode decide
        cls = lists.get(key) if isinstance(key, str) else None
        if cls is None:
            try:
                body[key] = unpacker.unpack()
            except Exception:
                raise _Irregular()
            continue
        list_spec = _list_spec(spec, key) if spec is not None else None
        try:
            count = unpacker.read_array_header()
        except Exception:
            raise _Irregular()
        if list_spec is not None and count > list_spec.max_len:
            raise _Irregular()
        items = []
        for i in range(count):
            try:
                v = unpacker.unpack()
            except Exception:
                raise _Irregular()
            if list_spec is not None:
                list_spec.inner.check(v, f"{path}.{key}[{i}]")
            elif not isinstance(v, dict) or not cls.FIELDS.issuperset(v):
                raise _Irregular()
            items.append(cls.from_dict(_shared_strings(v, strings)))
        body[key] = items
    if unpacker.tell() != len(meta):
        raise _Irregular()
    if spec is not None:
        shell = dict(body)
        for key in lists:
            if key in shell:
                shell[key] = []  # the items are checked above
        spec.check(shell, path)
    return body
