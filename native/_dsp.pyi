# Stub for the cffi-compiled DSP module (build_ext.py: ffi_dsp).
from typing import Any

ffi: Any
lib: Any
