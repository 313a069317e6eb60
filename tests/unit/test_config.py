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
