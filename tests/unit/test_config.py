"""GatewayConfig: defaults, environment, TOML, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig


def test_defaults_match_the_design() -> None:
    c = GatewayConfig.load(env={})
    assert (c.asr_link_codec, c.asr_link_bitrate, c.asr_link_frame_ms) == ("opus", 20000, 20)
    assert (c.partial_interval_ms, c.flush_idle_s, c.lid_first_n_s) == (250, 3.0, 3.0)
    assert not c.enable_denoise and c.enable_compress
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


def test_archive_store_defaults_to_local() -> None:
    c = GatewayConfig.load(env={})
    assert (c.archive_store, c.archive_spool_dir) == ("local", "")
    assert (c.s3_prefix, c.s3_region, c.s3_addressing_style) == ("records/", "us-east-1", "auto")
    assert c.s3_part_size_bytes == 5 * 1024 * 1024 and c.s3_presign_ttl_s == 900


def test_s3_store_from_environment() -> None:
    env = {"ARCHIVE_STORE": "s3", "S3_BUCKET": "voice-records", "S3_PREFIX": "prod/rec/",
           "S3_ENDPOINT_URL": "http://minio:9000", "S3_REGION": "eu-west-1",
           "S3_ACCESS_KEY_ID": "AKIDEXAMPLE", "S3_SECRET_ACCESS_KEY": "s3cr3t-value",
           "S3_PART_SIZE_BYTES": str(8 * 1024 * 1024), "S3_PRESIGN_TTL_S": "120",
           "S3_RETRY_DEADLINE_S": "5", "ARCHIVE_SPOOL_DIR": "/var/spool/voxgate"}
    c = GatewayConfig.load(env=env)
    assert (c.archive_store, c.s3_bucket, c.s3_prefix) == ("s3", "voice-records", "prod/rec/")
    assert (c.s3_endpoint_url, c.s3_region) == ("http://minio:9000", "eu-west-1")
    assert (c.s3_part_size_bytes, c.s3_presign_ttl_s, c.s3_retry_deadline_s) == (
        8 * 1024 * 1024, 120, 5.0)
    assert c.archive_spool_dir == "/var/spool/voxgate"
    # the secret never shows in a printed config
    assert "s3cr3t-value" not in repr(c) and "s3cr3t-value" not in str(c)
    assert "s3cr3t-value" not in GatewayConfig.describe()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ARCHIVE_STORE": "s3"}, "S3_BUCKET"),
        ({"ARCHIVE_STORE": "gcs", "S3_BUCKET": "b"}, "ARCHIVE_STORE"),
        ({"S3_PART_SIZE_BYTES": str(5 * 1024 * 1024 - 1)}, "S3_PART_SIZE_BYTES"),
        ({"S3_PRESIGN_TTL_S": "0"}, "S3_PRESIGN_TTL_S"),
        ({"S3_PRESIGN_TTL_S": str(8 * 24 * 3600)}, "S3_PRESIGN_TTL_S"),
        ({"S3_ENDPOINT_URL": "minio:9000"}, "S3_ENDPOINT_URL"),
        ({"S3_PREFIX": "/records/"}, "S3_PREFIX"),
        ({"S3_REGION": ""}, "S3_REGION"),
        ({"S3_ADDRESSING_STYLE": "dns"}, "S3_ADDRESSING_STYLE"),
        ({"S3_ACCESS_KEY_ID": "AKIDEXAMPLE"}, "S3_SECRET_ACCESS_KEY"),
        ({"S3_SECRET_ACCESS_KEY": "s3cr3t-value"}, "S3_ACCESS_KEY_ID"),
        ({"S3_RETRY_DEADLINE_S": "0"}, "S3_RETRY_DEADLINE_S"),
    ],
)
def test_invalid_s3_settings_name_the_key(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        GatewayConfig.load(env=env)
    assert "s3cr3t-value" not in str(info.value)


def test_describe_lists_the_archive_store_keys() -> None:
    text = GatewayConfig.describe()
    for key in ("ARCHIVE_STORE", "ARCHIVE_SPOOL_DIR", "S3_ENDPOINT_URL", "S3_BUCKET",
                "S3_PREFIX", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY",
                "S3_PART_SIZE_BYTES", "S3_PRESIGN_TTL_S", "S3_RETRY_DEADLINE_S"):
        assert key in text


@pytest.mark.parametrize(("raw", "want"), [
    (None, -60.0), ("off", None), ("OFF", None), ("-45.5", -45.5), ("-120", -120.0),
    ("0", 0.0)])
def test_vad_gate_dbfs(raw: str | None, want: float | None) -> None:
    env = {} if raw is None else {"VAD_GATE_DBFS": raw}
    assert GatewayConfig.load(env=env).vad_gate_dbfs == want


def test_vad_gate_off_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text('vad_gate_dbfs = "off"\narchive_opus_complexity = 0\n')
    c = GatewayConfig.load(env={}, file=toml)
    assert c.vad_gate_dbfs is None and c.archive_opus_complexity == 0


@pytest.mark.parametrize(("env", "needle"), [
    ({"VAD_GATE_DBFS": "3"}, "VAD_GATE_DBFS"), ({"VAD_GATE_DBFS": "-121"}, "VAD_GATE_DBFS"),
    ({"VAD_GATE_DBFS": "loud"}, "VAD_GATE_DBFS"), ({"VAD_GATE_DBFS": "true"}, "VAD_GATE_DBFS"),
    ({"ARCHIVE_OPUS_COMPLEXITY": "11"}, "ARCHIVE_OPUS_COMPLEXITY"),
    ({"ARCHIVE_OPUS_COMPLEXITY": "2.5"}, "ARCHIVE_OPUS_COMPLEXITY")])
def test_cpu_knobs_are_validated(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GatewayConfig.load(env=env)


def test_describe_shows_the_gate_default() -> None:
    text = GatewayConfig.describe()
    assert "VAD_GATE_DBFS" in text and "[-60.0]" in text
    assert "ARCHIVE_OPUS_COMPLEXITY" in text


def test_asr_link_opus_complexity() -> None:
    assert GatewayConfig.load(env={}).asr_link_opus_complexity == 2
    assert GatewayConfig.load(env={"ASR_LINK_OPUS_COMPLEXITY": "5"}
                              ).asr_link_opus_complexity == 5
    with pytest.raises(ValueError, match="ASR_LINK_OPUS_COMPLEXITY"):
        GatewayConfig.load(env={"ASR_LINK_OPUS_COMPLEXITY": "-1"})


def test_page_origins_come_from_public_base_and_the_s3_endpoint() -> None:
    from gateway.server import _web_origins

    cfg = GatewayConfig.load(env={}, overrides={"public_base": "https://rec.example.org/x"})
    assert _web_origins(cfg) == ["https://rec.example.org"]
    cfg = GatewayConfig.load(env={}, overrides={
        "archive_store": "s3", "s3_bucket": "b", "s3_endpoint_url": "http://10.0.0.5:9000"})
    assert _web_origins(cfg) == ["http://10.0.0.5:9000"]
    assert _web_origins(GatewayConfig.load(env={}, overrides={})) == []


def test_workers_default_one_environment_and_flag() -> None:
    assert GatewayConfig.load(env={}).workers == 1  # one process, no supervisor
    assert GatewayConfig.load(env={"WORKERS": "4"}).workers == 4
    assert GatewayConfig.load(env={"WORKERS": "4"}, overrides={"workers": 2}).workers == 2
    with pytest.raises(ValueError, match="WORKERS"):
        GatewayConfig.load(env={"WORKERS": "0"})


def test_workers_flag_reaches_the_config() -> None:
    from gateway.cli import build_parser
    from gateway.main import _config

    args = build_parser().parse_args(["gateway", "--workers", "3"])
    assert _config(args).workers == 3
    args = build_parser().parse_args(["serve"])  # serve has no --workers
    assert _config(args).workers == GatewayConfig.load().workers
