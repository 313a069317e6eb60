"""KvbmConfig: keyword arguments, KVBM_* variables and TOML/YAML files, validated with clear errors."""
from __future__ import annotations

import pytest

from kvbm.config import KvbmConfig, parse_size
from kvbm.errors import ConfigError
from kvbm.layout import LayoutConfig

LAYOUT = LayoutConfig(num_layers=32, outer_dim=2, page_size=16, inner_dim=1024, dtype="bfloat16")  # 2 MiB/block


def test_sizes_parse():
    assert parse_size("64GB", "k") == 64 * 10**9
    assert parse_size("512MiB", "k") == 512 * 2**20
    assert parse_size("1.5G", "k") == 1_500_000_000
    assert parse_size(4096, "k") == 4096
    for bad in ("ten GB", "5XB", "-1GB", True):
        with pytest.raises(ConfigError):
            parse_size(bad, "host_size")


def test_precedence_kwargs_over_env_over_file(tmp_path):
    path = tmp_path / "kvbm.toml"
    path.write_text('host_blocks = 10\npolicy = "lru"\nsalt = "from-file"\n[layout]\nnum_layers = 2\n'
                    'outer_dim = 2\npage_size = 16\ninner_dim = 64\ndtype = "float16"\nalignment = 1\n')
    cfg = KvbmConfig.load(str(path), env={"KVBM_HOST_BLOCKS": "20", "KVBM_SALT": "from-env"}, salt="from-kwargs")
    assert cfg.host_blocks == 20 and cfg.salt == "from-kwargs"
    assert cfg.layout == LayoutConfig(2, 2, 16, 64, "float16")


def test_yaml_file_and_kvbm_section(tmp_path):
    path = tmp_path / "kvbm.yaml"
    path.write_text("kvbm:\n  host_size: 1GiB\n  transport: tcp\n  tcp_port: 5555\n")
    cfg = KvbmConfig.load(env={"KVBM_CONFIG": str(path)})
    assert (cfg.host_size, cfg.transport, cfg.tcp_port) == (2**30, "tcp", 5555)


def test_env_gigabytes_and_blocks():
    cfg = KvbmConfig.load(env={"KVBM_HOST_GB": "4", "KVBM_DISK_GB": "1", "KVBM_DISK_PATH": "/tmp/x"})
    assert cfg.host_size == 4 * 10**9
    assert cfg.host_blocks_for(LAYOUT) == 4 * 10**9 // (2 << 20)
    assert cfg.disk_blocks_for(LAYOUT) == 10**9 // (2 << 20)


@pytest.mark.parametrize("kwargs, message", [
    (dict(host_blocks=-1), "host_blocks"),
    (dict(host_blocks=4, host_size=4096), "not both"),
    (dict(disk_blocks=4), "disk_path"),
    (dict(transport="udp"), "transport"),
    (dict(policy="random"), "policy"),
    (dict(tcp_port=70000), "tcp_port"),
    (dict(instance_id="../etc"), "instance_id"),
    (dict(bogus=1), "unknown config keys"),
    (dict(host_blocks="many"), "expected an integer"),
    (dict(force_cpu="maybe"), "boolean"),
    (dict(ghost_ratio=-1), "ghost_ratio"),
    (dict(ghost_ratio="lots"), "ghost_ratio: expected a number"),
    (dict(ghost_ratio="nan"), "ghost_ratio"),
    (dict(ghost_ratio=True), "ghost_ratio"),
    (dict(ghost_ratio=17), "ghost_ratio"),
    (dict(ghost_ratio=float("inf")), "ghost_ratio"),
    (dict(ghost_ratio=float("nan")), "ghost_ratio"),
])
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KvbmConfig.load(env={}, **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        KvbmConfig.load(str(tmp_path / "missing.toml"), env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("host_blocks = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        KvbmConfig.load(str(bad), env={})
    ini = tmp_path / "kvbm.ini"
    ini.write_text("x")
    with pytest.raises(ConfigError, match=".toml, .yaml"):
        KvbmConfig.load(str(ini), env={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        KvbmConfig.load(str(listy), env={})


def test_size_too_small_for_one_block():
    cfg = KvbmConfig.load(env={}, host_size="1MB")
    with pytest.raises(ConfigError, match="holds no block"):
        cfg.host_blocks_for(LAYOUT)


def test_direct_construction_parses_sizes():
    cfg = KvbmConfig(host_size="8MB", max_inflight_bytes="1GiB")
    assert (cfg.host_size, cfg.max_inflight_bytes) == (8 * 10**6, 2**30)
    with pytest.raises(ConfigError, match="host_size"):
        KvbmConfig(host_size="lots")


def test_ghost_ratio_sizes_each_tiers_ghost_table():
    """ghost_ratio (kwarg, KVBM_GHOST_RATIO or file) reaches every LINEAGE pool's registry."""
    from kvbm.manager import KvBlockManager
    from kvbm.pools import Tier
    assert KvbmConfig.load(env={}).ghost_ratio == 1.0
    cfg = KvbmConfig.load(env={"KVBM_GHOST_RATIO": "4", "KVBM_HOST_BLOCKS": "100", "KVBM_DEVICE_BLOCKS": "10"})
    assert cfg.ghost_ratio == 4.0 and cfg.ghost_blocks_for(100) == 400
    kv = KvBlockManager(cfg)
    try:
        assert kv.pools[Tier.G2].registry.ghost_blocks == 400
        assert kv.pools[Tier.G1].registry.ghost_blocks == 40
    finally:
        kv.close()
    with pytest.raises(ConfigError, match="ghost_ratio: expected a number"):
        KvbmConfig.load(env={"KVBM_GHOST_RATIO": "four"})
    with pytest.raises(ConfigError, match="lower ghost_ratio"):
        KvbmConfig(ghost_ratio=16).ghost_blocks_for(2**28)
    kv = KvBlockManager(KvbmConfig.load(env={}, host_blocks=100, ghost_ratio=0))
    try:
        assert kv.pools[Tier.G2].registry.ghost_blocks == 0
    finally:
        kv.close()


def test_disk_tier_settings_and_their_env_names():
    cfg = KvbmConfig.load(env={"KVBM_DISK_PATH": "/tmp/g3", "KVBM_DISK_BLOCKS": "100",
                               "KVBM_DISK_ADMISSION": "write-through", "KVBM_GDS": "off",
                               "KVBM_PREFILL_TOKENS_PER_S": "40000", "KVBM_DISK_COLD_START": "1",
                               "KVBM_DISK_FSIZE_LIMIT": "1048576"})
    assert (cfg.disk_path, cfg.disk_blocks, cfg.disk_admission, cfg.gds) == ("/tmp/g3", 100, "write-through", "off")
    assert (cfg.prefill_tokens_per_s, cfg.disk_cold_start, cfg.disk_fsize_limit) == (40000.0, True, 1 << 20)
    default = KvbmConfig()
    assert (default.disk_admission, default.gds, default.prefill_tokens_per_s, default.disk_cold_start) == \
        ("victim", "auto", 25000.0, False)
    for kwargs, message in ((dict(disk_admission="frequency"), "disk_admission"), (dict(gds="maybe"), "gds"),
                            (dict(prefill_tokens_per_s=0), "prefill_tokens_per_s"),
                            (dict(prefill_tokens_per_s="fast"), "prefill_tokens_per_s"),
                            (dict(disk_cold_start="perhaps"), "boolean"),
                            (dict(disk_fsize_limit=-1), "disk_fsize_limit")):
        with pytest.raises(ConfigError, match=message):
            KvbmConfig.from_dict(kwargs)


# ---- precedence: argument > environment > file > default, one test per rule ----------------------
def _file(tmp_path, text: str) -> str:
    path = tmp_path / "kvbm.toml"
    path.write_text(text)
    return str(path)


def test_default_when_no_source_gives_a_value():
    cfg = KvbmConfig.load(env={})
    assert (cfg.policy, cfg.host_blocks, cfg.host_size, cfg.request_timeout_ms, cfg.log_level) == \
        ("adaptive", None, None, 30000, "INFO")


def test_file_beats_default(tmp_path):
    cfg = KvbmConfig.load(_file(tmp_path, 'policy = "lru"\nrequest_timeout_ms = 500\n'), env={})
    assert (cfg.policy, cfg.request_timeout_ms) == ("lru", 500)


def test_environment_beats_default():
    assert KvbmConfig.load(env={"KVBM_POLICY": "lru"}).policy == "lru"


def test_environment_beats_file(tmp_path):
    cfg = KvbmConfig.load(_file(tmp_path, 'policy = "lru"\nrequest_timeout_ms = 500\n'),
                          env={"KVBM_POLICY": "lineage"})
    assert (cfg.policy, cfg.request_timeout_ms) == ("lineage", 500)   # the file's other keys stay


def test_argument_beats_environment():
    assert KvbmConfig.load(env={"KVBM_POLICY": "lru"}, policy="lineage").policy == "lineage"


def test_argument_beats_file(tmp_path):
    assert KvbmConfig.load(_file(tmp_path, 'policy = "lru"\n'), env={}, policy="lineage").policy == "lineage"


def test_none_argument_is_not_given():
    """kvbm-workers passes every flag, None when it was not on the command line."""
    assert KvbmConfig.load(env={"KVBM_POLICY": "lru"}, policy=None, host_size=None).policy == "lru"


def test_config_file_argument_beats_kvbm_config(tmp_path):
    (tmp_path / "a.toml").write_text('policy = "lru"\n')
    (tmp_path / "b.toml").write_text('policy = "lineage"\n')
    assert KvbmConfig.load(env={"KVBM_CONFIG": str(tmp_path / "a.toml")}).policy == "lru"
    assert KvbmConfig.load(str(tmp_path / "b.toml"), env={"KVBM_CONFIG": str(tmp_path / "a.toml")}).policy == "lineage"


# Each way a source can give the host tier's size, and what it gives: (host_blocks, host_size).
FILE_SIZES = {"host_blocks": ("host_blocks = 7\n", (7, None)),
              "host_size": ('host_size = "7MB"\n', (None, 7 * 10**6))}
ENV_SIZES = {"KVBM_HOST_BLOCKS": ({"KVBM_HOST_BLOCKS": "9"}, (9, None)),
             "KVBM_HOST_SIZE": ({"KVBM_HOST_SIZE": "9MiB"}, (None, 9 * 2**20)),
             "KVBM_HOST_GB": ({"KVBM_HOST_GB": "0.5"}, (None, 5 * 10**8))}
ARG_SIZES = {"host_blocks": ({"host_blocks": 11}, (11, None)),
             "host_size": ({"host_size": "11MB"}, (None, 11 * 10**6))}


def _host(cfg: KvbmConfig) -> tuple:
    return cfg.host_blocks, cfg.host_size


@pytest.mark.parametrize("low", FILE_SIZES)
@pytest.mark.parametrize("high", ENV_SIZES)
def test_environment_size_replaces_file_size_in_any_unit(tmp_path, low, high):
    env, want = ENV_SIZES[high]
    assert _host(KvbmConfig.load(_file(tmp_path, FILE_SIZES[low][0]), env=env)) == want


@pytest.mark.parametrize("low", FILE_SIZES)
@pytest.mark.parametrize("high", ARG_SIZES)
def test_argument_size_replaces_file_size_in_any_unit(tmp_path, low, high):
    kwargs, want = ARG_SIZES[high]
    assert _host(KvbmConfig.load(_file(tmp_path, FILE_SIZES[low][0]), env={}, **kwargs)) == want


@pytest.mark.parametrize("low", ENV_SIZES)
@pytest.mark.parametrize("high", ARG_SIZES)
def test_argument_size_replaces_environment_size_in_any_unit(tmp_path, low, high):
    kwargs, want = ARG_SIZES[high]
    assert _host(KvbmConfig.load(env=ENV_SIZES[low][0], **kwargs)) == want


def test_a_size_from_one_source_alone(tmp_path):
    for text, want in FILE_SIZES.values():
        assert _host(KvbmConfig.load(_file(tmp_path, text), env={})) == want
    for env, want in ENV_SIZES.values():
        assert _host(KvbmConfig.load(env=env)) == want
    for kwargs, want in ARG_SIZES.values():
        assert _host(KvbmConfig.load(env={}, **kwargs)) == want


def test_disk_size_replaces_across_sources_too(tmp_path):
    path = _file(tmp_path, 'disk_size = "1GB"\ndisk_path = "/tmp/g3"\n')
    cfg = KvbmConfig.load(path, env={"KVBM_DISK_BLOCKS": "5"})
    assert (cfg.disk_blocks, cfg.disk_size, cfg.disk_path) == (5, None, "/tmp/g3")
    cfg = KvbmConfig.load(path, env={"KVBM_DISK_BLOCKS": "5"}, disk_size="2GB")
    assert (cfg.disk_blocks, cfg.disk_size) == (None, 2 * 10**9)


@pytest.mark.parametrize("env, names", [
    ({"KVBM_HOST_SIZE": "1GB", "KVBM_HOST_GB": "2"}, ("KVBM_HOST_SIZE", "KVBM_HOST_GB")),
    ({"KVBM_HOST_BLOCKS": "3", "KVBM_HOST_GB": "2"}, ("KVBM_HOST_BLOCKS", "KVBM_HOST_GB")),
    ({"KVBM_HOST_BLOCKS": "3", "KVBM_HOST_SIZE": "1GB"}, ("KVBM_HOST_BLOCKS", "KVBM_HOST_SIZE")),
    ({"KVBM_DISK_SIZE": "1GB", "KVBM_DISK_GB": "2"}, ("KVBM_DISK_SIZE", "KVBM_DISK_GB")),
    ({"KVBM_DISK_BLOCKS": "3", "KVBM_DISK_SIZE": "1GB"}, ("KVBM_DISK_BLOCKS", "KVBM_DISK_SIZE")),
])
def test_two_spellings_of_one_size_in_the_environment_is_an_error(env, names):
    with pytest.raises(ConfigError) as err:
        KvbmConfig.load(env=env | {"KVBM_DISK_PATH": "/tmp/g3"})
    assert all(name in str(err.value) for name in names), err.value


def test_two_spellings_of_one_size_in_a_file_or_the_arguments_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="host_blocks and host_size both give the host tier's size in config file"):
        KvbmConfig.load(_file(tmp_path, 'host_blocks = 3\nhost_size = "1GB"\n'), env={})
    with pytest.raises(ConfigError, match="host_blocks and host_size both give the host tier's size in keyword"):
        KvbmConfig.load(env={}, host_blocks=3, host_size="1GB")


def test_direct_construction_reads_no_source(monkeypatch):
    """KvbmConfig(...) is the values given; load() and KvBlockManager(**kwargs) apply KVBM_*."""
    from kvbm.manager import KvBlockManager
    monkeypatch.setenv("KVBM_POLICY", "lru")
    monkeypatch.setenv("KVBM_HOST_BLOCKS", "16")
    assert (KvbmConfig(device_blocks=4).policy, KvbmConfig(device_blocks=4).host_blocks) == ("adaptive", None)
    assert KvbmConfig.load(device_blocks=4).policy == "lru"
    with KvBlockManager(device_blocks=4) as kv:
        assert (kv.config.policy, kv.config.host_blocks) == ("lru", 16)


# ---- unknown names ---------------------------------------------------------------------------------
def test_misspelled_environment_variable_warns_with_the_closest_name(caplog):
    with caplog.at_level("WARNING", logger="kvbm.config"):
        cfg = KvbmConfig.load(env={"KVBM_HOTS_GB": "4", "KVBM_LOGLEVEL": "debug", "KVBM_NO_CUDA": "1",
                                   "KVBM_CONFIG": "", "KVBM_ZZZ": "1"})
    assert cfg.host_size is None
    text = caplog.text
    assert "KVBM_HOTS_GB ignored; did you mean KVBM_HOST_GB?" in text
    assert "KVBM_LOGLEVEL ignored; did you mean KVBM_LOG_LEVEL?" in text
    assert "KVBM_ZZZ ignored; kvbm reads KVBM_DEVICE_BLOCKS" in text
    assert "KVBM_NO_CUDA" not in text and "KVBM_CONFIG" not in text   # read by the build / the loader


def test_unknown_file_key_is_an_error_with_the_closest_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'hots_blocks' \(did you mean 'host_blocks'\?\)"):
        KvbmConfig.load(_file(tmp_path, "hots_blocks = 3\n"), env={})


# ---- values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(host_size=float("nan")), "host_size: expected a finite size"),
    (dict(host_size=float("inf")), "host_size: expected a finite size"),
    (dict(disk_size=float("inf"), disk_path="/tmp/g3"), "disk_size: expected a finite size"),
    (dict(max_inflight_bytes=float("inf")), "max_inflight_bytes: expected a finite size"),
    (dict(host_size="2000TB"), "host_size: .* more than"),
    (dict(request_timeout_ms=float("nan")), "request_timeout_ms"),
    (dict(request_timeout_ms="inf"), "request_timeout_ms: expected an integer"),
    (dict(request_timeout_ms=10**12), r"request_timeout_ms: expected an integer in \[1, 3600000\]"),
    (dict(request_timeout_ms=0), "request_timeout_ms"),
    (dict(copy_threads=10**6), r"copy_threads: expected an integer in \[0, 1024\]"),
    (dict(max_batch_blocks=10**6), "max_batch_blocks"),
    (dict(max_batch_blocks=0), "max_batch_blocks"),
    (dict(worker_delay_ms=10**9), "worker_delay_ms"),
    (dict(host_blocks=2**31), "host_blocks"),
    (dict(tcp_port=65534), "tcp_port"),
    (dict(host_blocks=0), "host_blocks: 0 gives no host tier"),
    (dict(host_size="0"), "host_size: 0 gives no host tier"),
    (dict(salt=5), "salt: expected a string"),
])
def test_non_finite_zero_and_absurd_values_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KvbmConfig.load(env={}, **kwargs)


@pytest.mark.parametrize("env, message", [
    ({"KVBM_HOST_GB": "nan"}, "host_size: .* got 'nan' .from KVBM_HOST_GB in the environment"),
    ({"KVBM_HOST_GB": "0"}, "host_size: 0 gives no host tier.* .from KVBM_HOST_GB in the environment"),
    ({"KVBM_REQUEST_TIMEOUT_MS": "1e12"}, "request_timeout_ms: expected an integer, got '1e12' .from KVBM_"),
    ({"KVBM_COPY_THREADS": "1000000"}, r"copy_threads: expected an integer in \[0, 1024\], got 1000000 .from KVBM_"),
])
def test_bad_environment_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        KvbmConfig.load(env=env)


def test_bad_file_values_name_the_file(tmp_path):
    path = _file(tmp_path, "host_size = nan\n")
    where = f"from host_size in config file {path}"
    with pytest.raises(ConfigError, match=f"host_size: expected a finite size, got nan .{where}"):
        KvbmConfig.load(path, env={})
    path = _file(tmp_path, "request_timeout_ms = 1_000_000_000_000\n")
    with pytest.raises(ConfigError, match="request_timeout_ms: expected an integer in .* .from request_timeout_ms in"):
        KvbmConfig.load(path, env={})


def test_zero_disk_size_means_no_disk_tier():
    cfg = KvbmConfig.load(env={"KVBM_DISK_GB": "0"})
    assert cfg.disk_size == 0 and cfg.disk_blocks_for(LAYOUT) == 0


# ---- Dynamo KVBM drop-in variables --------------------------------------------------------------
def test_dynamo_aliases_read_as_dynamo_means_them(caplog):
    env = {"DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "1.5", "DYN_KVBM_DISK_CACHE_DIR": "/tmp/g3"}
    with caplog.at_level("INFO", logger="kvbm.config"):
        cfg = KvbmConfig.load(env=env)
    # decimal GB, as Dynamo's leader computes gb * 1e9 / bytes_per_block
    assert (cfg.host_size, cfg.disk_size, cfg.disk_path) == (4 * 10**9, 1_500_000_000, "/tmp/g3")
    assert cfg.host_blocks_for(LAYOUT) == 4 * 10**9 // LAYOUT.block_stride
    assert "host_size: 4000000000 from Dynamo KVBM's DYN_KVBM_CPU_CACHE_GB" in caplog.text
    assert "disk_path: '/tmp/g3' from Dynamo KVBM's DYN_KVBM_DISK_CACHE_DIR" not in caplog.text   # %s, not %r
    assert "disk_path: /tmp/g3 from Dynamo KVBM's DYN_KVBM_DISK_CACHE_DIR" in caplog.text


def test_dynamo_block_override_wins_over_gb_and_zero_is_no_tier(caplog):
    with caplog.at_level("INFO", logger="kvbm.config"):
        cfg = KvbmConfig.load(env={"DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "100",
                                   "DYN_KVBM_DISK_CACHE_GB": "0"})
    assert (cfg.host_blocks, cfg.host_size, cfg.disk_size, cfg.disk_blocks) == (100, None, None, None)
    assert "the block count is used, as in Dynamo" in caplog.text
    assert "DYN_KVBM_DISK_CACHE_GB=0: no disk tier" in caplog.text
    assert KvbmConfig.load(env={"DYN_KVBM_CPU_CACHE_GB": "0"}).host_size is None


def test_kvbm_settings_win_over_dynamo_aliases_with_a_warning(caplog):
    env = {"DYN_KVBM_CPU_CACHE_GB": "4", "KVBM_HOST_GB": "8", "DYN_KVBM_DISK_CACHE_DIR": "/d", "KVBM_DISK_PATH": "/d"}
    with caplog.at_level("INFO", logger="kvbm.config"):
        cfg = KvbmConfig.load(env=env)
    assert (cfg.host_size, cfg.disk_path) == (8 * 10**9, "/d")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["host_size: 4000000000 from Dynamo KVBM's DYN_KVBM_CPU_CACHE_GB is replaced by host_size "
                        "8000000000 from KVBM_HOST_GB in the environment (a KVBM_* setting or a keyword argument "
                        "wins over a Dynamo alias)"]
    assert "disk_path: Dynamo KVBM's DYN_KVBM_DISK_CACHE_DIR and KVBM_DISK_PATH in the environment agree (/d)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvbm.config"):   # blocks against bytes: another value; keywords win too
        cfg = KvbmConfig.load(env={"DYN_KVBM_CPU_CACHE_GB": "4", "KVBM_HOST_BLOCKS": "7"})
        assert cfg.host_blocks == 7 and cfg.host_size is None
        assert KvbmConfig.load(env={"DYN_KVBM_CPU_CACHE_GB": "4"}, host_size="2GB").host_size == 2 * 10**9
    assert len(caplog.records) == 2 and "replaced by host_blocks 7 from KVBM_HOST_BLOCKS in the environment" in \
        caplog.records[0].getMessage()
    assert "replaced by host_size 2000000000 from host_size in keyword arguments" in caplog.records[1].getMessage()


def test_dynamo_metrics_variables_map_to_the_engine_metrics_port(caplog):
    assert KvbmConfig.load(env={}).engine_metrics_port is None
    assert KvbmConfig.load(env={"DYN_KVBM_METRICS": "true"}).engine_metrics_port == 6880
    assert KvbmConfig.load(env={"DYN_KVBM_METRICS": "1", "DYN_KVBM_METRICS_PORT": "7000"}).engine_metrics_port == 7000
    assert KvbmConfig.load(env={"DYN_KVBM_METRICS": "1", "KVBM_ENGINE_METRICS_PORT": "0"}).engine_metrics_port == 0
    with caplog.at_level("INFO", logger="kvbm.config"):
        cfg = KvbmConfig.load(env={"DYN_KVBM_METRICS_PORT": "7000", "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "9"})
    assert cfg.engine_metrics_port is None
    assert "Dynamo serves metrics only with DYN_KVBM_METRICS=true" in caplog.text
    assert "no kvbm setting, ignored: DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS" in caplog.text


@pytest.mark.parametrize("env, message", [
    ({"DYN_KVBM_CPU_CACHE_GB": "4GB"}, "DYN_KVBM_CPU_CACHE_GB: expected a number of GB"),
    ({"DYN_KVBM_CPU_CACHE_GB": "lots"}, "host_size: .*from DYN_KVBM_CPU_CACHE_GB in the environment .Dynamo"),
    ({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "x"}, "host_blocks: expected an integer, got 'x' .from DYN_KVBM_"),
    ({"DYN_KVBM_DISK_CACHE_GB": "2"}, "a disk tier needs disk_path"),
    ({"DYN_KVBM_METRICS": "yes", "DYN_KVBM_METRICS_PORT": "70000"}, "engine_metrics_port: expected an integer in"),
    ({"DYN_KVBM_METRICS": "maybe"}, "DYN_KVBM_METRICS: expected a boolean"),
])
def test_bad_dynamo_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        KvbmConfig.load(env=env)


def test_engine_integration_settings():
    cfg = KvbmConfig.load(env={"KVBM_ENGINE_METRICS_PORT": "9100", "KVBM_ENGINE_METRICS_HOST": "0.0.0.0",
                               "KVBM_EVENTS_ENDPOINT": "tcp://127.0.0.1:5557",
                               "KVBM_EVENTS_REPLAY_ENDPOINT": "ipc:///tmp/replay"})
    assert (cfg.engine_metrics_port, cfg.engine_metrics_host) == (9100, "0.0.0.0")
    assert (cfg.events_endpoint, cfg.events_replay_endpoint) == ("tcp://127.0.0.1:5557", "ipc:///tmp/replay")
    with pytest.raises(ConfigError, match="engine_metrics_host: expected an IP address"):
        KvbmConfig(engine_metrics_host="metrics.example")
    with pytest.raises(ConfigError, match="events_endpoint: expected tcp://HOST:PORT"):
        KvbmConfig(events_endpoint="127.0.0.1:5557")
