"""KvbmConfig: the one place that reads KVBM_* environment variables and config files.

Sources, highest first: keyword arguments (`KvbmConfig.load(**kw)`, `KvBlockManager(**kw)`, the flags
of kvbm-workers), the environment (KVBM_*), the config file (TOML or YAML, named by `config_file=` or
KVBM_CONFIG), then the defaults. `KvbmConfig(...)` itself takes exactly the values it is given (tests,
programs that resolved their settings themselves); `KvbmConfig.load(...)` is the constructor that
applies the sources. Every value is validated once, here, with an error that
names the key as its source spelled it; the rest of kvbm takes a frozen KvbmConfig.

Load order: read each source (file, environment, keywords) into its own map, parsing strings and
sizes under the source's own names -> refuse two spellings of one setting within one source ->
merge low to high -> construct and validate (__post_init__: types, bounds, cross-field rules).

Precedence is by source, not by key. A tier size is one setting, whether in blocks or in bytes and
whatever its spelling (`host_blocks`, `host_size`, KVBM_HOST_BLOCKS, KVBM_HOST_SIZE, KVBM_HOST_GB;
the same for disk): a higher source's size replaces a lower source's size entirely, and two
spellings of one size in one source are an error that names both. Sizes in bytes take units
("64GB", "512MiB", "1.5G"; KVBM_*_GB=64 means 64 GB); `host_blocks_for(layout)` turns bytes into
whole blocks once the block size is known. A host tier of 0 blocks or 0 bytes is an error (leave it
unset for a manager without one); a disk size of 0 means no disk tier.

Dynamo KVBM's variables are read as aliases, a source of their own just below the KVBM_* ones
(so any KVBM_* setting, and any keyword argument, wins): DYN_KVBM_CPU_CACHE_GB -> host_size,
DYN_KVBM_DISK_CACHE_GB -> disk_size (decimal GB, 10**9 bytes, fractions allowed, as Dynamo's leader
computes `gb * 1e9 / bytes_per_block`), DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS -> host_blocks and
DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS -> disk_blocks (Dynamo: the block count wins over the GB
size), DYN_KVBM_DISK_CACHE_DIR -> disk_path, and DYN_KVBM_METRICS=true with DYN_KVBM_METRICS_PORT
(Dynamo's default 6880) -> engine_metrics_port. A size of 0 means "no such tier" to Dynamo: the
alias is then not used. The start-up log says which alias was used, and warns where a KVBM_*
setting or a keyword replaced one with another value. Other DYN_KVBM_* variables have no kvbm
setting (leader/worker timeouts, NIXL, object storage): logged as ignored.

Unknown names: an unknown keyword or file key is an error (it can only be a mistake), an unknown
KVBM_* variable a logged warning naming the closest known one (an environment is shared with other
programs and other kvbm versions, so it cannot stop a start).

Why not pydantic-settings: what these rules need is exactly what it does not do by default. Its
merge is per key, so `host_size` from a file and KVBM_HOST_BLOCKS would both survive (the bug this
loader fixes); KVBM_HOST_GB's unit, the size groups, the `[kvbm]` section of a shared file and the
warning for a misspelled variable would each be a custom source or validator. What is left for the
library is parsing five scalar types, some fifty lines here, against two new dependencies (pydantic
and its compiled pydantic-core) in every install and in kvbm-workers, which vLLM and SGLang processes
carry but kvbm would use for nothing else. Frozen slotted dataclasses are also what the rest of kvbm
uses (STYLE.md). Each precedence rule has a test in tests/unit/test_config.py.
"""
from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvbm.errors import ConfigError, LayoutError
from kvbm.layout import LayoutConfig
from kvbm.policy import EvictionPolicy, policy_names

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")

POLICIES = policy_names()          # ("lru", "lineage", "adaptive"): kvbm.policy.EvictionPolicy's members
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DISK_ADMISSIONS = ("victim", "write-through")   # research/eviction/RESULTS.md, "G3 admission"
GDS_MODES = ("auto", "on", "off")
TRANSPORTS = ("ipc", "tcp")
MAX_GHOST_RATIO = 16
MAX_GHOST_BLOCKS = 2**31 - 2      # the registry's limit on ghost entries (and on blocks)
MAX_BLOCKS = 2**31 - 2            # the registry's limit on the blocks of one tier
MAX_BYTES = 2**50                 # 1 PiB: past any tier or in-flight bound one machine can hold
MAX_BATCH_BLOCKS = 1 << 16        # the wire protocol's limit on block pairs per request
MAX_COPY_THREADS = 1024
MAX_TIMEOUT_MS = 3_600_000        # an hour: a transfer request or a test delay longer than that is a typo
MAX_TCP_PORT = 65535 - 3          # an instance binds 4 consecutive ports from tcp_port (control, events, 2 paths)

# NIXL reads of G3 (DISK2H): blocks per request, requests in flight (see KvbmConfig.disk_read_*).
DISK_READ_BLOCKS = 16
DISK_READ_INFLIGHT = 4
# bench/RESULTS.md, "Waiters settle": the spin that covers a small request's copy and its worker's
# wake-up on the machines measured (1-block round trip 200-350 us with lanes, before). Auto (-1):
# this with 4 CPUs or more; on fewer, a spinning waiter takes the core its worker needs to wake on
# (2-core machine: the worker's wake-up went from 50 to 90-113 us, the round trip no faster).
WAIT_SPIN_US = 500

# Every integer setting: (lowest, highest) allowed.
_INT_BOUNDS = {
    "device_blocks": (0, MAX_BLOCKS), "host_blocks": (1, MAX_BLOCKS), "disk_blocks": (0, MAX_BLOCKS),
    "host_size": (1, MAX_BYTES), "disk_size": (0, MAX_BYTES), "max_inflight_bytes": (1, MAX_BYTES),
    "tcp_port": (0, MAX_TCP_PORT), "max_batch_blocks": (1, MAX_BATCH_BLOCKS), "copy_threads": (0, MAX_COPY_THREADS),
    "request_timeout_ms": (1, MAX_TIMEOUT_MS), "worker_delay_ms": (0, MAX_TIMEOUT_MS),
    "lane_spin_us": (-1, 100_000), "wait_spin_us": (-1, 100_000), "shared_idle_exit_s": (1, 86_400),
    "disk_fsize_limit": (0, MAX_BYTES), "engine_metrics_port": (0, 65535),
    "disk_read_blocks": (1, MAX_BATCH_BLOCKS), "disk_read_inflight": (1, 256),
    "disk_onboard_chunk_blocks": (0, MAX_BATCH_BLOCKS),
}
_SIZE_KEYS = ("host_size", "disk_size", "max_inflight_bytes")   # bytes, with units
_INT_KEYS = tuple(k for k in _INT_BOUNDS if k not in _SIZE_KEYS)
# One setting each, however spelled: a source gives at most one of a group, and a higher source's
# member replaces a lower source's.
_SIZE_GROUPS = {"host_blocks": ("host_blocks", "host_size"), "host_size": ("host_blocks", "host_size"),
                "disk_blocks": ("disk_blocks", "disk_size"), "disk_size": ("disk_blocks", "disk_size")}


def parse_size(value: int | float | str, key: str) -> int:
    """Bytes from 123, "64GB", "512MiB", "1.5G" (decimal G, binary GiB). `key` names the setting
    as the user spelled it, in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a size like '64GB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        if isinstance(value, float):
            number, unit = value, ""
        else:
            match = _SIZE.match(value)
            if not match:
                raise ConfigError(f"{key}: expected a size like '64GB' or '512MiB', got {value!r}")
            number, unit = float(match.group(1)), match.group(2).upper()
        if unit not in _UNITS:
            raise ConfigError(f"{key}: unknown size unit {unit!r} in {value!r}; use B, KB, MB, GB, TB or KiB..TiB")
        if not math.isfinite(number * _UNITS[unit]):
            raise ConfigError(f"{key}: expected a finite size, got {value!r}")
        size = int(number * _UNITS[unit])
    if size < 0:
        raise ConfigError(f"{key}: size must be >= 0, got {value!r}")
    if size > MAX_BYTES:
        raise ConfigError(f"{key}: {value!r} is {size} bytes, more than the {MAX_BYTES} (1 PiB) kvbm takes")
    return size


@dataclass(frozen=True, slots=True)
class KvbmConfig:
    """Settings of one kvbm engine and of its kvbm-workers. `KvbmConfig(...)` takes the values as
    given; `KvbmConfig.load(...)` applies the config file and KVBM_* variables under them."""

    layout: LayoutConfig | None = None     # model dims; None until an engine registers its tensors
    device_blocks: int = 0                 # G1 pool size (the engine's own KV blocks)
    host_blocks: int | None = None         # G2 size in blocks, or
    host_size: int | None = None           #   in bytes (one of the two; >= 1 block; unset: no G2)
    disk_blocks: int | None = None         # G3 size in blocks, or
    disk_size: int | None = None           #   in bytes; 0/None: no disk tier
    disk_path: str | None = None           # folder for the G3 files
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names shm segments, sockets
    runtime_dir: str | None = None         # 0700 folder for ipc:// sockets; default $XDG_RUNTIME_DIR or /tmp
    transport: str = "ipc"                 # ipc, or tcp on 127.0.0.1
    tcp_port: int = 0                      # first port when transport is tcp (0: pick free ports)
    policy: str = "adaptive"               # eviction policy of every tier: adaptive, lineage or lru
                                           #   (kvbm/policy.py; adaptive tunes lineage's frequency
                                           #   credit online: research/eviction/POLICY_ADAPTIVE.md)
    # lineage's (and adaptive's) ghost table (use counts of recently evicted hashes), in multiples of each tier's
    # block count; 0: none. More remembers more reuse (research/eviction/POLICY_ROUND3.md: 4 gives +0.01 hit
    # ratio, +0.05 of the LRU -> Belady gap, on the shared trace) but the entries share the block
    # index, so lookups slow down (with 4: up to 1.2x LRU at 10^4-10^5 blocks, 1.2-1.6x at 10^6;
    # bench/RESULTS.md). The tables live in RAM for every tier, G3's included.
    ghost_ratio: float = 1.0
    # Model, LoRA or cache salt: the manager folds it into every hash it is given
    # (kvbm.hashing.salt_keys), so managers of different salts never share a block; "" folds nothing.
    salt: str = ""
    max_inflight_bytes: int = 4 << 30      # TransferManager backpressure bound
    max_batch_blocks: int = 256            # blocks per transfer request
    copy_threads: int = 0                  # CPU copy threads (0: the library's default)
    force_cpu: bool = False                # CPU mode even when CUDA is available
    # Small transfers through a shared-memory lane per path (kvbm.transfer.lane) instead of a
    # ZeroMQ message each way; off: every request goes over ZeroMQ (as before issue 12).
    lanes: bool = True
    # How long an idle path worker keeps polling its lanes before it sleeps on its doorbell, and
    # the engine's I/O thread its lanes' completions while requests are out: a record that comes
    # within it is taken without a doorbell (a syscall and a wake-up, ~15-20 us each measured),
    # for a core kept busy that long. -1: lane_spin_default (AUTO_LANE_SPIN_US with 8 CPUs or more, else 0).
    lane_spin_us: int = -1
    # How long result() of a small lane request (<= 4 MiB) spins on its lane, without the GIL,
    # before it sleeps: a completion that comes within it is settled by the waiting thread itself
    # (TransferManager._settle_waiting), without the doorbell, the I/O thread's wake-up and the
    # hand-off back. 0: the waiter sleeps at once and the I/O thread settles everything; -1:
    # wait_spin_default (WAIT_SPIN_US with 4 CPUs or more, else 0).
    wait_spin_us: int = -1
    # An embedded kvbm-workers that data-parallel replicas share outlives the replica that started
    # it, and stops once no engine has been attached for this long (seconds).
    shared_idle_exit_s: int = 30
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
    # NIXL reads of the disk worker (DISK2H): blocks per NIXL request and requests in flight. A
    # sweep of 1/4/16 blocks x 1-16 in flight on the CPU machine (bench/RESULTS.md, "Disk -> Device")
    # found none clearly above the others on its shared disk, so the defaults stay the store's
    # (16 x 4); a machine whose disk wants more concurrency sets them from its own sweep.
    disk_read_blocks: int = DISK_READ_BLOCKS
    disk_read_inflight: int = DISK_READ_INFLIGHT
    # An onboard's G3 run is read in chunks of this many blocks, each chunk's H2D starting once it
    # has landed (0: disk_read_blocks x disk_read_inflight, what keeps the disk worker's reads full).
    disk_onboard_chunk_blocks: int = 0
    disk_cold_start: bool = False          # a G3 journal of another layout/model: discarded (warning), not refused
    disk_fsize_limit: int = 0              # test hook: RLIMIT_FSIZE of the disk worker once its store is open (0: none)
    # ---- engine integrations (kvbm.integrations) ----
    engine_metrics_port: int | None = None  # the engine side's Prometheus endpoint (0: a free port; None: none);
                                            # kvbm-workers' own is its --metrics-port
    engine_metrics_host: str = "127.0.0.1"  # its address: another than loopback is reachable from other hosts
    events_endpoint: str | None = None      # KV events PUB socket: tcp://127.0.0.1:PORT or ipc://PATH (None: none)
    events_replay_endpoint: str | None = None  # its replay ROUTER socket (None: no replay)

    def __post_init__(self) -> None:
        # Sizes given directly ("64GB", 1.5e9) are parsed here; the loader has parsed its sources'.
        for key in _SIZE_KEYS:
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                object.__setattr__(self, key, parse_size(value, key))
        if self.layout is not None and not isinstance(self.layout, LayoutConfig):
            raise ConfigError(f"layout: expected a LayoutConfig, got {type(self.layout).__name__}")
        for key, (lo, hi) in _INT_BOUNDS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{key}: expected a non-negative int, got {value!r}")
            if key in ("host_blocks", "host_size") and value == 0:
                raise ConfigError(f"{key}: 0 gives no host tier; leave host_blocks and host_size unset for a "
                                  "manager without one")
            if not lo <= value <= hi:
                raise ConfigError(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")
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
        if not isinstance(self.salt, str):
            raise ConfigError(f"salt: expected a string, got {type(self.salt).__name__}")
        if not isinstance(self.force_cpu, bool):
            raise ConfigError(f"force_cpu: expected a boolean, got {self.force_cpu!r}")
        if not isinstance(self.lanes, bool):
            raise ConfigError(f"lanes: expected a boolean, got {self.lanes!r}")
        _check_host(self.engine_metrics_host)
        for key in ("events_endpoint", "events_replay_endpoint"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"(tcp|ipc|inproc)://.+", value)):
                raise ConfigError(f"{key}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {value!r}")
        if not isinstance(self.instance_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.instance_id):
            raise ConfigError(f"instance_id: 1-40 letters, digits, '_' or '-', got {self.instance_id!r}")

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: str | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> KvbmConfig:
        """Defaults < file < KVBM_* env < keyword arguments (None: not given), by source: see the
        module docstring. `env` defaults to os.environ."""
        env = os.environ if env is None else env
        _warn_unknown_env(env)
        sources = []
        path = config_file or env.get("KVBM_CONFIG")
        if path:
            sources.append(_parse_source(_read_file(path), f"config file {path}"))
        dynamo = _from_dynamo_env(env)
        sources.append(dynamo)
        sources.append(_from_env(env))
        sources.append(_parse_source({k: v for k, v in overrides.items() if v is not None}, KEYWORDS))
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        winner: dict[str, _Source] = {}
        for source in sources:
            for key, value in source.values.items():
                for member in _SIZE_GROUPS.get(key, ()):   # the tier's size, in whichever unit
                    values.pop(member, None)
                    origin.pop(member, None)
                    winner.pop(member, None)
                values[key] = value
                origin[key] = f"{source.spelled[key]} in {source.where}"
                winner[key] = source
        _log_aliases(dynamo, values, origin, winner)
        try:
            return cls(**values)
        except ConfigError as err:
            key = str(err).partition(":")[0]   # the messages of __post_init__ open with the key
            if key in origin and not origin[key].endswith(f" in {KEYWORDS}"):
                raise ConfigError(f"{err} (from {origin[key]})") from err   # where the bad value came from
            raise

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KvbmConfig:
        """A config from one map of settings (a file's, say): strings and sizes parsed, no
        environment read."""
        return cls(**_parse_source(values, "the settings").values)

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
    if count > MAX_BLOCKS:
        raise ConfigError(f"{tier}_size {size} bytes is {count} blocks of {layout.block_stride} bytes; "
                          f"a tier holds at most {MAX_BLOCKS}")
    return count


# ---- sources ------------------------------------------------------------------------------------
KEYWORDS = "keyword arguments"


@dataclass(frozen=True, slots=True)
class _Source:
    where: str                 # "the environment", "config file PATH", "keyword arguments"
    values: dict[str, Any]     # field name -> parsed value
    spelled: dict[str, str]    # field name -> the name the user gave it, for errors ("KVBM_HOST_GB")


def _parse_source(raw: Mapping[str, Any], where: str, spelled: Mapping[str, str] | None = None) -> _Source:
    """One source's settings, strings and sizes parsed under the names the source used. Unknown keys
    and two spellings of one setting are errors naming them."""
    known = [f.name for f in fields(KvbmConfig)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"unknown config keys in {where}: {', '.join(hints)}; known: {sorted(known)}")
    spelled = {key: (spelled or {}).get(key, key) for key in raw}
    for key in raw:
        for other in _SIZE_GROUPS.get(key, ()):
            if other != key and other in raw:
                first, second = sorted((spelled[key], spelled[other]))
                raise ConfigError(f"{first} and {second} both give the {key.split('_')[0]} tier's size in "
                                  f"{where}; give one, not both")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key == "layout" and isinstance(value, Mapping):
                try:
                    value = LayoutConfig.from_dict(dict(value))
                except LayoutError as err:
                    raise ConfigError(f"layout: {err}") from err
            elif key in _SIZE_KEYS:
                value = parse_size(value, key)
            elif key in _INT_KEYS and isinstance(value, str):
                value = _parse_int(value, key)
            elif key in ("force_cpu", "disk_cold_start", "lanes") and isinstance(value, str):
                value = _parse_bool(value, key)
            elif key in ("ghost_ratio", "prefill_tokens_per_s") and isinstance(value, str):
                value = _parse_float(value, key)
        except ConfigError as err:
            if where == KEYWORDS:
                raise
            raise ConfigError(f"{err} (from {spelled[key]} in {where})") from err
        values[key] = value
    return _Source(where, values, spelled)


_ENV_KEYS = {
    "KVBM_DEVICE_BLOCKS": "device_blocks", "KVBM_HOST_BLOCKS": "host_blocks", "KVBM_HOST_SIZE": "host_size",
    "KVBM_HOST_GB": "host_size", "KVBM_DISK_BLOCKS": "disk_blocks", "KVBM_DISK_SIZE": "disk_size",
    "KVBM_DISK_GB": "disk_size", "KVBM_DISK_PATH": "disk_path", "KVBM_INSTANCE_ID": "instance_id",
    "KVBM_RUNTIME_DIR": "runtime_dir", "KVBM_TRANSPORT": "transport", "KVBM_TCP_PORT": "tcp_port",
    "KVBM_POLICY": "policy", "KVBM_GHOST_RATIO": "ghost_ratio", "KVBM_SALT": "salt",
    "KVBM_MAX_INFLIGHT": "max_inflight_bytes",
    "KVBM_MAX_BATCH_BLOCKS": "max_batch_blocks", "KVBM_COPY_THREADS": "copy_threads",
    "KVBM_FORCE_CPU": "force_cpu", "KVBM_LANES": "lanes", "KVBM_LANE_SPIN_US": "lane_spin_us",
    "KVBM_WAIT_SPIN_US": "wait_spin_us", "KVBM_SHARED_IDLE_EXIT_S": "shared_idle_exit_s",
    "KVBM_REQUEST_TIMEOUT_MS": "request_timeout_ms",
    "KVBM_WORKER_DELAY_MS": "worker_delay_ms", "KVBM_LOG_LEVEL": "log_level",
    "KVBM_DISK_ADMISSION": "disk_admission", "KVBM_GDS": "gds", "KVBM_PREFILL_TOKENS_PER_S": "prefill_tokens_per_s",
    "KVBM_DISK_COLD_START": "disk_cold_start", "KVBM_DISK_FSIZE_LIMIT": "disk_fsize_limit",
    "KVBM_ENGINE_METRICS_PORT": "engine_metrics_port", "KVBM_ENGINE_METRICS_HOST": "engine_metrics_host",
    "KVBM_EVENTS_ENDPOINT": "events_endpoint", "KVBM_EVENTS_REPLAY_ENDPOINT": "events_replay_endpoint",
    "KVBM_DISK_READ_BLOCKS": "disk_read_blocks", "KVBM_DISK_READ_INFLIGHT": "disk_read_inflight",
    "KVBM_DISK_ONBOARD_CHUNK_BLOCKS": "disk_onboard_chunk_blocks",
}
# KVBM_* variables read elsewhere: the config file's name, the build's (setup.py), the eviction studies'.
# Dynamo KVBM's variables read as aliases (see the module docstring).
_DYN_KEYS = {
    "DYN_KVBM_CPU_CACHE_GB": "host_size", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "host_blocks",
    "DYN_KVBM_DISK_CACHE_GB": "disk_size", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "disk_blocks",
    "DYN_KVBM_DISK_CACHE_DIR": "disk_path", "DYN_KVBM_METRICS_PORT": "engine_metrics_port",
}
DYN_VARS = tuple(_DYN_KEYS) + ("DYN_KVBM_METRICS",)
DYNAMO_METRICS_PORT = 6880     # Dynamo's DYN_KVBM_METRICS_PORT default
DYNAMO = "the environment (Dynamo KVBM aliases)"
_OTHER_VARS = ("KVBM_CONFIG", "KVBM_NO_CUDA", "KVBM_DEBUG", "KVBM_CUDA_ARCHS", "KVBM_TRACE")
ENV_VARS = tuple(_ENV_KEYS) + _OTHER_VARS   # every KVBM_* variable kvbm knows


def _from_env(env: Mapping[str, str]) -> _Source:
    raw: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for var, key in _ENV_KEYS.items():
        value = env.get(var, "")
        if value == "":
            continue
        if key in raw:   # KVBM_HOST_SIZE and KVBM_HOST_GB
            raise ConfigError(f"{spelled[key]} and {var} both give the {key.split('_')[0]} tier's size in the "
                              "environment; give one, not both")
        # KVBM_HOST_GB=64 means 64 GB; KVBM_HOST_SIZE takes any unit.
        raw[key] = f"{value}GB" if var.endswith("_GB") and _SIZE.match(value) and value.strip()[-1].isdigit() \
            else value
        spelled[key] = var
    return _parse_source(raw, "the environment", spelled)


def _from_dynamo_env(env: Mapping[str, str]) -> _Source:
    """DYN_KVBM_* aliases as Dynamo reads them: a block count wins over a GB size, 0 GB is no tier,
    metrics only with DYN_KVBM_METRICS=true."""
    raw: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    given = {var: env[var].strip() for var in DYN_VARS if env.get(var, "").strip() != ""}
    for tier, gb_var, blocks_var in (("host", "DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"),
                                     ("disk", "DYN_KVBM_DISK_CACHE_GB", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS")):
        gb, blocks = given.get(gb_var), given.get(blocks_var)
        if blocks is not None:
            if gb is not None:
                logger.info("%s=%s and %s=%s: the block count is used, as in Dynamo", blocks_var, blocks, gb_var, gb)
            if blocks not in ("0", "+0"):
                raw[f"{tier}_blocks"], spelled[f"{tier}_blocks"] = blocks, blocks_var
        elif gb is not None:
            if _SIZE.match(gb) and not gb[-1].isdigit():
                raise ConfigError(f"{gb_var}: expected a number of GB (10**9 bytes) like 4 or 1.5, got {gb!r} "
                                  f"(from {DYNAMO})")
            if _SIZE.match(gb) and float(gb) == 0:
                logger.info("%s=%s: no %s tier (Dynamo's meaning of 0)", gb_var, gb, tier)
            else:
                raw[f"{tier}_size"], spelled[f"{tier}_size"] = f"{gb}GB", gb_var
    if "DYN_KVBM_DISK_CACHE_DIR" in given:
        raw["disk_path"], spelled["disk_path"] = given["DYN_KVBM_DISK_CACHE_DIR"], "DYN_KVBM_DISK_CACHE_DIR"
    metrics = given.get("DYN_KVBM_METRICS")
    if metrics is not None and _parse_bool(metrics, "DYN_KVBM_METRICS"):
        port = given.get("DYN_KVBM_METRICS_PORT")
        raw["engine_metrics_port"] = port if port is not None else DYNAMO_METRICS_PORT
        spelled["engine_metrics_port"] = "DYN_KVBM_METRICS_PORT" if port is not None else "DYN_KVBM_METRICS"
    elif "DYN_KVBM_METRICS_PORT" in given:
        logger.info("DYN_KVBM_METRICS_PORT ignored: Dynamo serves metrics only with DYN_KVBM_METRICS=true")
    ignored = sorted(v for v in env if v.startswith("DYN_KVBM_") and v not in DYN_VARS)
    if ignored:
        logger.info("Dynamo KVBM variables with no kvbm setting, ignored: %s", ", ".join(ignored))
    return _parse_source(raw, DYNAMO, spelled)


def _log_aliases(dynamo: _Source, values: Mapping[str, Any], origin: Mapping[str, str],
                 winner: Mapping[str, _Source]) -> None:
    """Says which Dynamo alias was used, and warns where a higher source replaced one with another
    value (a tier size in blocks against one in bytes counts as another value)."""
    for key, value in dynamo.values.items():
        var = dynamo.spelled[key]
        if winner.get(key) is dynamo:
            logger.info("%s: %s from Dynamo KVBM's %s", key, value, var)
            continue
        kept = next((k for k in _SIZE_GROUPS.get(key, (key,)) if k in values), key)
        if kept == key and values.get(key) == value:
            logger.info("%s: Dynamo KVBM's %s and %s agree (%s)", key, var, origin[key], value)
        else:
            logger.warning("%s: %s from Dynamo KVBM's %s is replaced by %s %s from %s (a KVBM_* setting or a "
                           "keyword argument wins over a Dynamo alias)", key, value, var, kept, values.get(kept),
                           origin.get(kept))


def _check_host(host: Any) -> None:
    try:
        ipaddress.ip_address(host)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"engine_metrics_host: expected an IP address like 127.0.0.1, got {host!r}") from err


def _warn_unknown_env(env: Mapping[str, str]) -> None:
    """A misspelled KVBM_* variable would otherwise be ignored without a word."""
    names = {var[5:]: var for var in ENV_VARS}   # compared without the KVBM_ every one shares
    for var in sorted(v for v in env if v.upper().startswith("KVBM_") and v not in ENV_VARS):
        close = difflib.get_close_matches(var[5:].upper(), names, 1)
        logger.warning("unknown environment variable %s ignored; %s", var,
                       f"did you mean {names[close[0]]}?" if close else "kvbm reads " + ", ".join(_ENV_KEYS))


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


# The auto spin where cores are plenty. 0: on the H200 machine (16 CPUs) a 200 us spin on both sides
# measured no better round trip than none (173/190 against 159/145 us p50, same lease) and slowed
# the per-layer onboard (49% against 65% of the copy alone): bench/RESULTS.md, "Lanes".
AUTO_LANE_SPIN_US = 0


def lane_spin_default(configured: int) -> int:
    """lane_spin_us resolved: -1 (auto) spins where cores are plenty, not where a spinning worker
    would take the engine's own CPU (a 2-core machine)."""
    if configured >= 0:
        return configured
    return 0 if (os.cpu_count() or 1) < 8 else AUTO_LANE_SPIN_US


def wait_spin_default(configured: int) -> int:
    """wait_spin_us resolved: -1 (auto) spins only where a spinning waiter leaves cores to the
    worker it waits for."""
    if configured >= 0:
        return configured
    return WAIT_SPIN_US if (os.cpu_count() or 1) >= 4 else 0


def _parse_bool(raw: str, key: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected a boolean (1/0, true/false), got {raw!r}")
