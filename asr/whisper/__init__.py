"""Whisper as ONNX: weights reader, graph exporter, runtime, front end, decoding."""
