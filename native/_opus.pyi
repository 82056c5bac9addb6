# Stub for the cffi-compiled libopus binding (build_ext.py: ffi_opus).
from typing import Any

ffi: Any
lib: Any
