"""GatewayConfig: defaults, environment, TOML, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig


def test_defaults_match_the_design() -> None:
    c = GatewayConfig.load(env={})
    assert (c.asr_link_codec, c.asr_link_bitrate, c.asr_link_frame_ms) == ("opus", 20000, 20)
    assert (c.partial_interval_ms, c.flush_idle_s, c.lid_first_n_s) == (250, 3.0, 3.0)
    assert c.enable_denoise and c.enable_compress
    assert (c.endpoint_silence_ms, c.max_utterance_s, c.preroll_ms) == (700, 20.0, 300)


def test_environment_and_file_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text('partial_interval_ms = 400\nasr_link_codec = "pcm"\n'
                    'asr_urls = ["http://a:1", "http://b:2"]\n[asr_pools]\nen = "http://en:1"\n')
    env = {"PARTIAL_INTERVAL_MS": "300", "ENABLE_DENOISE": "off", "FLUSH_IDLE_SEC": "1.5"}
    c = GatewayConfig.load(env=env, file=toml, overrides={"port": 0, "host": None})
    assert c.partial_interval_ms == 300  # env wins over the file
    assert c.asr_link_codec == "pcm"
    assert c.asr_urls == ("http://a:1", "http://b:2")
    assert c.enable_denoise is False and c.flush_idle_s == 1.5 and c.port == 0
    assert c.pool_urls() == {"default": ("http://a:1", "http://b:2"), "en": ("http://en:1",),
                             "multi": ("http://a:1", "http://b:2")}
    assert c.route("en") == "en" and c.route("en-GB") == "en" and c.route("de") == "multi"


def test_pools_from_environment() -> None:
    c = GatewayConfig.load(env={"ASR_POOLS": "en=http://x:1, multi=http://y:2"})
    assert c.asr_pools == (("en", "http://x:1"), ("multi", "http://y:2"))


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ASR_LINK_CODEC": "mp3"}, "ASR_LINK_CODEC"),
        ({"ASR_LINK_BITRATE": "64000"}, "ASR_LINK_BITRATE"),
        ({"ASR_LINK_BITRATE": "fast"}, "ASR_LINK_BITRATE"),
        ({"ENABLE_COMPRESS": "maybe"}, "ENABLE_COMPRESS"),
        ({"PUBLIC_BASE": "records.example"}, "PUBLIC_BASE"),
        ({"ASR_URLS": "asr:8090"}, "ASR_URLS"),
        ({"ASR_POOLS": "en"}, "ASR_POOLS"),
        ({"VOXGATE_PORT": "70000"}, "VOXGATE_PORT"),
    ],
)
def test_invalid_values_name_the_key(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GatewayConfig.load(env=env)


def test_unknown_file_key(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text("partial_interval = 3\n")
    with pytest.raises(ValueError, match="unknown key 'partial_interval'"):
        GatewayConfig.load(env={}, file=toml)


def test_describe_lists_every_key() -> None:
    text = GatewayConfig.describe()
    for key in ("ASR_LINK_CODEC", "ASR_LINK_BITRATE", "PARTIAL_INTERVAL_MS", "FLUSH_IDLE_SEC",
                "LID_FIRST_N_SECONDS", "ENABLE_DENOISE", "ENABLE_COMPRESS", "PUBLIC_BASE"):
        assert key in text
