"""The stream format: the one place that knows how cowtree's stages talk.

Use StreamWriter / StreamReader; never hand-parse another stage's output.
"""

from .codec import (OutputFile, Record, StreamReader, StreamWriter, is_broken_pipe, open_input, os_error_text,
                    reread_data, silence_broken_pipe)
from .errors import StreamError
from .packed import pack_u32, unpack_u32, view_u32
from . import images, plans

__all__ = [
    "OutputFile", "Record", "os_error_text", "StreamReader", "StreamWriter", "StreamError",
    "is_broken_pipe", "open_input", "pack_u32", "reread_data", "silence_broken_pipe", "unpack_u32", "view_u32",
    "images", "plans",
]
