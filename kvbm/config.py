"""KvbmConfig: the one place that reads KVBM_* environment variables and config files.

Precedence, highest first: keyword arguments, environment (KVBM_*), the config file (TOML or YAML,
named by `config_file=` or KVBM_CONFIG), then defaults. Every value is validated once, here, with an
error that names the key and what was expected; the rest of kvbm takes a frozen KvbmConfig.

Tier sizes are given in blocks (`host_blocks=4096`) or bytes (`host_size="64GB"`, also "512MiB",
"1.5G"); `host_blocks_for(layout)` resolves bytes to whole blocks once the block size is known.
"""
from __future__ import annotations

import os
import re
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvbm.errors import ConfigError
from kvbm.layout import LayoutConfig
from kvbm.policy import EvictionPolicy, policy_names

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")

POLICIES = policy_names()          # ("lru", "lineage"): kvbm.policy.EvictionPolicy's members
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DISK_ADMISSIONS = ("victim", "write-through")   # research/eviction/RESULTS.md, "G3 admission"
GDS_MODES = ("auto", "on", "off")
TRANSPORTS = ("ipc", "tcp")
MAX_GHOST_RATIO = 16
MAX_GHOST_BLOCKS = 2**31 - 2      # the registry's limit on ghost entries (and on blocks)


def parse_size(value: int | float | str, key: str) -> int:
    """Bytes from 123, "64GB", "512MiB", "1.5G" (decimal G, binary GiB)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '64GB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{key}: expected a size like '64GB' or '512MiB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise ConfigError(f"{key}: unknown size unit {unit!r} in {value!r}; use B, KB, MB, GB, TB or KiB..TiB")
    size = int(number * _UNITS[unit])
    if size < 0:
        raise ConfigError(f"{key}: size must be >= 0, got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class KvbmConfig:
    layout: LayoutConfig | None = None     # model dims; None until an engine registers its tensors
    device_blocks: int = 0                 # G1 pool size (the engine's own KV blocks)
    host_blocks: int | None = None         # G2 size in blocks, or
    host_size: int | None = None           #   in bytes (one of the two)
    disk_blocks: int | None = None         # G3 size in blocks, or
    disk_size: int | None = None           #   in bytes; 0/None: no disk tier
    disk_path: str | None = None           # folder for the G3 files
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names shm segments, sockets
    runtime_dir: str | None = None         # 0700 folder for ipc:// sockets; default $XDG_RUNTIME_DIR or /tmp
    transport: str = "ipc"                 # ipc, or tcp on 127.0.0.1
    tcp_port: int = 0                      # first port when transport is tcp (0: pick free ports)
    policy: str = "lineage"                # eviction policy of every tier: lineage or lru (kvbm/policy.py)
    # lineage's ghost table (use counts of recently evicted hashes), in multiples of each tier's
    # block count; 0: none. More remembers more reuse (research/eviction/POLICY_ROUND3.md: 4 gives +0.01 hit
    # ratio, +0.05 of the LRU -> Belady gap, on the shared trace) but the entries share the block
    # index, so lookups slow down (with 4: up to 1.2x LRU at 10^4-10^5 blocks, 1.2-1.6x at 10^6;
    # bench/RESULTS.md). The tables live in RAM for every tier, G3's included.
    ghost_ratio: float = 1.0
    salt: str = ""                         # folded into the hash seed (model, LoRA, cache salt)
    max_inflight_bytes: int = 4 << 30      # TransferManager backpressure bound
    max_batch_blocks: int = 256            # blocks per transfer request
    copy_threads: int = 0                  # CPU copy threads (0: the library's default)
    force_cpu: bool = False                # CPU mode even when CUDA is available
    request_timeout_ms: int = 30000        # deadline of one transfer request (engine side safety net)
    worker_delay_ms: int = 0               # test hook: path workers sleep this long before each copy
    log_level: str = "INFO"                # kvbm-workers' log level (supervisor and path workers), any case
    # ---- disk tier (G3) ----
    # Which G2 blocks are written to G3: "victim" (those G2 evicts, written by a cleaner ahead of
    # need) or "write-through" (every block registered in G2). Measured: research/eviction/RESULTS.md.
    disk_admission: str = "victim"
    gds: str = "auto"                      # GPUDirect Storage: auto (probe), on (required), off
    # The engine's prefill rate: a G3 prefix is offered only where reading it is expected to take
    # less time than recomputing its tokens at this rate (kvbm.transfer.disk_offload.LoadRule).
    prefill_tokens_per_s: float = 25000.0
    disk_cold_start: bool = False          # a G3 journal of another layout/model: discarded (warning), not refused
    disk_fsize_limit: int = 0              # test hook: RLIMIT_FSIZE of the disk worker once its store is open (0: none)

    def __post_init__(self) -> None:
        # The one place sizes are parsed: "64GB", "512MiB" or 1.5e9 from arguments, env and files alike.
        for key in ("host_size", "disk_size", "max_inflight_bytes"):
            value = getattr(self, key)
            if isinstance(value, (str, float)):
                object.__setattr__(self, key, parse_size(value, key))
        if self.layout is not None and not isinstance(self.layout, LayoutConfig):
            raise ConfigError(f"layout: expected a LayoutConfig, got {type(self.layout).__name__}")
        for key in ("device_blocks", "host_blocks", "disk_blocks", "host_size", "disk_size", "tcp_port",
                    "max_inflight_bytes", "max_batch_blocks", "copy_threads", "request_timeout_ms",
                    "worker_delay_ms", "disk_fsize_limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{key}: expected a non-negative int, got {value!r}")
        if self.host_blocks is not None and self.host_size is not None:
            raise ConfigError("give host_blocks or host_size, not both")
        if self.disk_blocks is not None and self.disk_size is not None:
            raise ConfigError("give disk_blocks or disk_size, not both")
        if (self.disk_blocks or self.disk_size) and not self.disk_path:
            raise ConfigError("a disk tier needs disk_path")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport: expected one of {TRANSPORTS}, got {self.transport!r}")
        level = self.log_level.upper() if isinstance(self.log_level, str) else self.log_level
        if level not in LOG_LEVELS:
            raise ConfigError(f"log_level: expected one of {LOG_LEVELS} (any case), got {self.log_level!r}")
        object.__setattr__(self, "log_level", level)
        if self.disk_admission not in DISK_ADMISSIONS:
            raise ConfigError(f"disk_admission: expected one of {DISK_ADMISSIONS}, got {self.disk_admission!r}")
        if self.gds not in GDS_MODES:
            raise ConfigError(f"gds: expected one of {GDS_MODES}, got {self.gds!r}")
        if isinstance(self.prefill_tokens_per_s, str):
            object.__setattr__(self, "prefill_tokens_per_s", _parse_float(self.prefill_tokens_per_s,
                                                                         "prefill_tokens_per_s"))
        rate = self.prefill_tokens_per_s
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
            raise ConfigError(f"prefill_tokens_per_s: expected a number > 0, got {rate!r}")
        if not isinstance(self.disk_cold_start, bool):
            raise ConfigError(f"disk_cold_start: expected a bool, got {self.disk_cold_start!r}")
        EvictionPolicy.from_name(self.policy)   # ConfigError naming the known policies
        if isinstance(self.ghost_ratio, str):
            object.__setattr__(self, "ghost_ratio", _parse_float(self.ghost_ratio, "ghost_ratio"))
        ratio = self.ghost_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_GHOST_RATIO:
            raise ConfigError(f"ghost_ratio: expected a number in [0, {MAX_GHOST_RATIO}], got {ratio!r}")
        if self.tcp_port > 65535:
            raise ConfigError(f"tcp_port: expected 0..65535, got {self.tcp_port}")
        if self.request_timeout_ms < 1:
            raise ConfigError(f"request_timeout_ms: expected >= 1, got {self.request_timeout_ms}")
        if self.max_batch_blocks < 1 or self.max_inflight_bytes < 1:
            raise ConfigError("max_batch_blocks and max_inflight_bytes must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.instance_id):
            raise ConfigError(f"instance_id: 1-40 letters, digits, '_' or '-', got {self.instance_id!r}")

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: str | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> KvbmConfig:
        """Defaults < file < KVBM_* env < keyword arguments."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("KVBM_CONFIG")
        if path:
            values.update(_read_file(path))
        values.update(_from_env(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KvbmConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        data = dict(values)
        layout = data.get("layout")
        if isinstance(layout, Mapping):
            data["layout"] = LayoutConfig.from_dict(layout)
        for key in ("device_blocks", "host_blocks", "disk_blocks", "tcp_port", "max_batch_blocks", "copy_threads",
                    "request_timeout_ms", "worker_delay_ms", "disk_fsize_limit"):
            if isinstance(data.get(key), str):
                data[key] = _parse_int(data[key], key)
        for key in ("force_cpu", "disk_cold_start"):
            if isinstance(data.get(key), str):
                data[key] = _parse_bool(data[key], key)
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(str(err)) from err

    # ---- derived -------------------------------------------------------------------------------
    def host_blocks_for(self, layout: LayoutConfig) -> int:
        return _blocks(self.host_blocks, self.host_size, layout, "host")

    def ghost_blocks_for(self, blocks: int) -> int:
        """Entries of the ghost table of a tier of `blocks` blocks."""
        ghosts = int(blocks * self.ghost_ratio)
        if ghosts > MAX_GHOST_BLOCKS:
            raise ConfigError(f"ghost_ratio {self.ghost_ratio} gives a tier of {blocks} blocks {ghosts} ghost "
                              f"entries; the registry takes at most {MAX_GHOST_BLOCKS}: lower ghost_ratio")
        return ghosts

    def disk_blocks_for(self, layout: LayoutConfig) -> int:
        return _blocks(self.disk_blocks, self.disk_size, layout, "disk")

    def resolved_runtime_dir(self) -> str:
        base = self.runtime_dir or os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        return os.path.join(base, f"kvbm-{self.instance_id}")


def _blocks(blocks: int | None, size: int | None, layout: LayoutConfig, tier: str) -> int:
    if blocks is not None:
        return blocks
    if size is None:
        return 0
    count = size // layout.block_stride
    if size and count == 0:
        raise ConfigError(f"{tier}_size {size} bytes holds no block of {layout.block_stride} bytes")
    return count


_ENV_KEYS = {
    "KVBM_DEVICE_BLOCKS": "device_blocks", "KVBM_HOST_BLOCKS": "host_blocks", "KVBM_HOST_SIZE": "host_size",
    "KVBM_HOST_GB": "host_size", "KVBM_DISK_BLOCKS": "disk_blocks", "KVBM_DISK_SIZE": "disk_size",
    "KVBM_DISK_GB": "disk_size", "KVBM_DISK_PATH": "disk_path", "KVBM_INSTANCE_ID": "instance_id",
    "KVBM_RUNTIME_DIR": "runtime_dir", "KVBM_TRANSPORT": "transport", "KVBM_TCP_PORT": "tcp_port",
    "KVBM_POLICY": "policy", "KVBM_GHOST_RATIO": "ghost_ratio", "KVBM_SALT": "salt",
    "KVBM_MAX_INFLIGHT": "max_inflight_bytes",
    "KVBM_MAX_BATCH_BLOCKS": "max_batch_blocks", "KVBM_COPY_THREADS": "copy_threads",
    "KVBM_FORCE_CPU": "force_cpu", "KVBM_REQUEST_TIMEOUT_MS": "request_timeout_ms",
    "KVBM_WORKER_DELAY_MS": "worker_delay_ms", "KVBM_LOG_LEVEL": "log_level",
    "KVBM_DISK_ADMISSION": "disk_admission", "KVBM_GDS": "gds", "KVBM_PREFILL_TOKENS_PER_S": "prefill_tokens_per_s",
    "KVBM_DISK_COLD_START": "disk_cold_start", "KVBM_DISK_FSIZE_LIMIT": "disk_fsize_limit",
}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, key in _ENV_KEYS.items():
        if var in env and env[var] != "":
            raw = env[var]
            # KVBM_HOST_GB=64 means 64 GB; KVBM_HOST_SIZE takes any unit.
            values[key] = f"{raw}GB" if var.endswith("_GB") and _SIZE.match(raw) and raw.strip()[-1].isdigit() else raw
    return values


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        if path.endswith(".toml"):
            data = tomllib.loads(raw.decode())
        elif path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(raw) or {}
        else:
            raise ConfigError(f"config file {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, without importing yaml at module load
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(data).__name__}")
    return data.get("kvbm", data) if isinstance(data.get("kvbm"), dict) else data


def _parse_int(raw: str, key: str) -> int:
    try:
        return int(raw.strip())
    except ValueError as err:
        raise ConfigError(f"{key}: expected an integer, got {raw!r}") from err


def _parse_float(raw: str, key: str) -> float:
    try:
        return float(raw.strip())
    except ValueError as err:
        raise ConfigError(f"{key}: expected a number, got {raw!r}") from err


def _parse_bool(raw: str, key: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected a boolean (1/0, true/false), got {raw!r}")
