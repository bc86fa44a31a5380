"""Errors raised by the stream layer."""


class StreamError(Exception):
    """A stream is malformed, truncated, corrupted or of an unsupported version."""
