"""The ASR link's Opus encoder takes its effort from ASR_LINK_OPUS_COMPLEXITY."""

from __future__ import annotations

import pytest

from asr import link
from gateway.asrlink import DEFAULT_LINK_OPUS_COMPLEXITY, AsrChannel, AsrPools


def _start() -> link.Start:
    return link.Start(flow_id="f", codec="opus", sr=16000, channels=1, frame_ms=20,
                      bitrate=20000, vbr=True, lang_hint="en", domain="default",
                      hotwords=())


@pytest.mark.parametrize("complexity", [0, 2, 5, 10])
def test_channel_encoder_uses_the_setting(complexity: int) -> None:
    pools = AsrPools({"default": ("http://127.0.0.1:9",)})
    ch = AsrChannel(pools, "default", _start(), codec="opus", bitrate=20000,
                    complexity=complexity)
    assert ch._encoder is not None and ch._encoder.complexity == complexity


def test_default_is_two() -> None:
    pools = AsrPools({"default": ("http://127.0.0.1:9",)})
    ch = AsrChannel(pools, "default", _start(), codec="opus", bitrate=20000)
    assert ch._encoder is not None
    assert ch._encoder.complexity == DEFAULT_LINK_OPUS_COMPLEXITY == 2


def test_pcm_link_has_no_encoder() -> None:
    pools = AsrPools({"default": ("http://127.0.0.1:9",)})
    ch = AsrChannel(pools, "default", _start(), codec="pcm", bitrate=20000, complexity=7)
    assert ch._encoder is None
