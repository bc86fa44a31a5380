"""A small declarative checker for record bodies.

Record schemas (images.py, plans.py) are written with these constructors; the
reader checks every body against its kind's schema, so a stage never sees a
field of the wrong type or a missing one.  Messages name the record and the
path of the offending field.
"""

from .errors import StreamError

U64_MAX = (1 << 64) - 1


class Spec:
    def check(self, value, path):  # pragma: no cover - interface
        raise NotImplementedError

    def fail(self, path, what):
        raise StreamError(f"{path}: {what}")


class Int(Spec):
    def __init__(self, lo=None, hi=None):
        self.lo, self.hi = lo, hi

    def check(self, value, path):
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"expected an integer, got {type(value).__name__}")
        if self.lo is not None and value < self.lo:
            self.fail(path, f"{value} is below {self.lo}")
        if self.hi is not None and value > self.hi:
            self.fail(path, f"{value} is above {self.hi}")


def UInt(hi=U64_MAX):
    return Int(0, hi)


class Str(Spec):
    def __init__(self, max_len=4096, choices=None):
        self.max_len, self.choices = max_len, choices

    def check(self, value, path):
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            self.fail(path, f"string of {len(value)} characters is too long")
        if self.choices is not None and value not in self.choices:
            self.fail(path, f"{value!r} is not one of {sorted(self.choices)}")


class Bin(Spec):
    def __init__(self, multiple=1, max_len=None):
        self.multiple, self.max_len = multiple, max_len

    def check(self, value, path):
        if not isinstance(value, bytes):
            self.fail(path, f"expected binary, got {type(value).__name__}")
        if len(value) % self.multiple:
            self.fail(path, f"length {len(value)} is not a multiple of {self.multiple}")
        if self.max_len is not None and len(value) > self.max_len:
            self.fail(path, f"length {len(value)} is above {self.max_len}")


class Bool(Spec):
    def check(self, value, path):
        if not isinstance(value, bool):
            self.fail(path, f"expected true/false, got {type(value).__name__}")


class Any(Spec):
    def check(self, value, path):
        pass


class Nullable(Spec):
    def __init__(self, inner):
        self.inner = inner

    def check(self, value, path):
        if value is not None:
            self.inner.check(value, path)


class ListOf(Spec):
    def __init__(self, inner, max_len=1 << 22):
        self.inner, self.max_len = inner, max_len

    def check(self, value, path):
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_len:
            self.fail(path, f"list of {len(value)} items is above the limit {self.max_len}")
        for i, item in enumerate(value):
            self.inner.check(item, f"{path}[{i}]")


class Tuple(Spec):
    """A fixed-length list whose items have their own specs."""

    def __init__(self, *items):
        self.items = items

    def check(self, value, path):
        if not isinstance(value, list) or len(value) != len(self.items):
            self.fail(path, f"expected a list of {len(self.items)} items")
        for i, (spec, item) in enumerate(zip(self.items, value)):
            spec.check(item, f"{path}[{i}]")


class Map(Spec):
    """A map with named fields.  ``optional`` fields may be absent; no others may appear."""

    def __init__(self, required, optional=None):
        self.required = required
        self.optional = optional or {}

    def check(self, value, path):
        if not isinstance(value, dict):
            as_dict = getattr(type(value), "as_dict", None)  # a compact body (stream.compact)
            if as_dict is None:
                self.fail(path, f"expected a map, got {type(value).__name__}")
            value = as_dict(value)  # checked as the dict it packs to
        for name, spec in self.required.items():
            if name not in value:
                self.fail(path, f"missing field {name!r}")
            spec.check(value[name], f"{path}.{name}")
        for name, item in value.items():
            if name in self.required:
                continue
            spec = self.optional.get(name)
            if spec is None:
                self.fail(path, f"unknown field {name!r}")
            spec.check(item, f"{path}.{name}")


class MapOf(Spec):
    """A map from keys of one spec to values of another."""

    def __init__(self, key, value, max_len=1 << 16):
        self.key, self.value, self.max_len = key, value, max_len

    def check(self, value, path):
        if not isinstance(value, dict):
            self.fail(path, f"expected a map, got {type(value).__name__}")
        if len(value) > self.max_len:
            self.fail(path, f"map of {len(value)} entries is above the limit")
        for k, v in value.items():
            self.key.check(k, f"{path} key")
            self.value.check(v, f"{path}[{k!r}]")
