# Stub for the cffi-compiled libopusenc binding (build_ext.py: ffi_opusenc).
from typing import Any

ffi: Any
lib: Any
