"""`kvbm-workers`: runs the supervisor and path workers of one kvbm instance, or asks one for its status.

  kvbm-workers --instance-id prod --host-size 64GB              # serve until SIGINT/SIGTERM
  kvbm-workers --instance-id prod --status                       # tiers, workers, queues, throughput
Settings come from KvbmConfig (file, KVBM_* env, then these flags). CUDA mode is used when the
native library was built with CUDA and a device answers, unless --force-cpu.

Operator messages go through `logging` to stderr (level: --log-level / KVBM_LOG_LEVEL / log_level,
INFO by default; the path workers get the same level). stdout carries only the result of --status
(exit status 0 serving, 3 starting, 1 not running). A usage or configuration error (a bad flag or
value, a metrics port in use) is one line on stderr and exit status 2, as argparse's own are; any
other kvbm error exits 1. A closed stdout or stderr (`| head -1`) never
stops the instance without its clean-up: everything after taking the instance lock runs inside
the try/finally that removes the segment, sockets and runtime folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, KvbmError, KvbmTimeoutError, LifecycleError
from kvbm.layout import LayoutConfig

logger = logging.getLogger("kvbm.cli" if __name__ == "__main__" else __name__)  # `python -m kvbm.cli` too


def parse_layout(spec: str) -> LayoutConfig:
    """'layers=32,outer=2,page=16,inner=1024,dtype=bfloat16' -> LayoutConfig."""
    names = {"layers": "num_layers", "outer": "outer_dim", "page": "page_size", "inner": "inner_dim",
             "dtype": "dtype", "alignment": "alignment"}
    values: dict = {"dtype": "bfloat16", "alignment": 1}
    for part in filter(None, spec.split(",")):
        key, _, raw = part.partition("=")
        key = key.strip()
        if key not in names:
            raise ConfigError(f"--layout: unknown key {key!r}; expected {sorted(names)}")
        if key == "dtype":
            values["dtype"] = raw.strip()
            continue
        try:
            values[names[key]] = int(raw)
        except ValueError:
            raise ConfigError(f"--layout: {key} expects an integer, got {raw.strip()!r} in {spec!r}") from None
    missing = sorted(k for k, v in names.items() if v not in values)
    if missing:
        raise ConfigError(f"--layout: {spec!r} lacks {', '.join(missing)}; e.g. "
                          "layers=32,outer=2,page=16,inner=1024,dtype=bfloat16")
    try:
        return LayoutConfig.from_dict(values)
    except KvbmError as err:
        raise ConfigError(f"--layout {spec!r}: {err}") from err


def _seconds(raw: str) -> float:
    """A finite, non-negative number of seconds (argparse answers anything else with exit status 2)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {raw!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvbm-workers",
        description="kvbm transfer workers: owns the shared pinned host pool (G2) and runs the D2H/H2D path "
                    "workers that engines send block transfers to over ZeroMQ.")
    ap.add_argument("--config", help="TOML or YAML config file (KvbmConfig keys)")
    ap.add_argument("--instance-id", help="names the runtime dir, sockets and shared-memory segments")
    ap.add_argument("--runtime-dir",
                    help="parent of the 0700 kvbm-<instance> folder (default $XDG_RUNTIME_DIR or /tmp)")
    ap.add_argument("--host-size", help="G2 size, e.g. 64GB or 512MiB")
    ap.add_argument("--host-blocks", type=int, help="G2 size in blocks (needs --layout)")
    ap.add_argument("--layout", help="model dims, e.g. layers=32,outer=2,page=16,inner=1024,dtype=bfloat16")
    ap.add_argument("--policy", help="eviction policy of the shared G2 registry's namespaces (lru, lineage, adaptive)")
    ap.add_argument("--ghost-ratio", type=float, help="LINEAGE ghost entries per block of a namespace")
    ap.add_argument("--disk-path", help="G3 folder (created 0700)")
    ap.add_argument("--disk-size", help="G3 size, e.g. 1TB")
    ap.add_argument("--disk-blocks", type=int, help="G3 size in blocks")
    ap.add_argument("--gds", choices=["auto", "on", "off"],
                    help="GPUDirect Storage for G3 reads: auto (probe, else staged through G2), on, off")
    ap.add_argument("--transport", choices=["ipc", "tcp"])
    ap.add_argument("--tcp-port", type=int, help="first of 5 loopback ports (0: pick free ones)")
    ap.add_argument("--force-cpu", action="store_true", default=None, help="CPU copies even if CUDA is available")
    ap.add_argument("--copy-threads", type=int, help="CPU copy threads per worker (0: library default)")
    ap.add_argument("--interval", type=_seconds, default=10.0, help="seconds between summary lines (0: none)")
    ap.add_argument("--duration", type=_seconds, help="exit after this many seconds (tests, benchmarks)")
    ap.add_argument("--status", action="store_true", help="ask the running instance for its status and exit")
    ap.add_argument("--json", action="store_true", help="with --status: print the raw JSON")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="stop when the process that started this one dies (embedded mode)")
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="with --exit-with-parent: the pid to follow (default: the parent at start)")
    ap.add_argument("--g2-ranks", type=int, default=1,
                    help="with --layout: G2 holds this many tensor-parallel ranks' regions, each a shard of every "
                         "block of the shared registry (the layout is one rank's shard)")
    ap.add_argument("--exit-when-idle", type=_seconds, default=0,
                    help="stop once no engine has been attached for this many seconds (an embedded instance "
                         "that several engines share: it outlives the one that started it)")
    ap.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default: log_level of the config, INFO)")
    return ap


def config_from_args(args: argparse.Namespace) -> KvbmConfig:
    layout = parse_layout(args.layout) if args.layout else None
    return KvbmConfig.load(args.config, instance_id=args.instance_id, runtime_dir=args.runtime_dir,
                           host_size=args.host_size, host_blocks=args.host_blocks, layout=layout,
                           disk_path=args.disk_path, disk_size=args.disk_size, disk_blocks=args.disk_blocks,
                           transport=args.transport,
                           tcp_port=args.tcp_port, force_cpu=args.force_cpu, copy_threads=args.copy_threads,
                           log_level=args.log_level, gds=args.gds, policy=args.policy,
                           ghost_ratio=args.ghost_ratio)


def host_bytes_of(config: KvbmConfig) -> int:
    if config.host_size:
        return config.host_size
    if config.host_blocks:
        if config.layout is None:
            raise ConfigError("host_blocks needs the model layout (--layout) to size G2; or give --host-size")
        return config.host_blocks * config.layout.block_stride
    raise ConfigError("no G2 size: give --host-size (e.g. 8GB) or --host-blocks with --layout")


def ask_status(config: KvbmConfig, timeout: float = 3.0) -> dict:
    import zmq

    from kvbm.transfer.launcher import find_instance
    from kvbm.wire import protocol as P
    from kvbm.wire.auth import ClientKeys
    from kvbm.wire.channel import connect_socket, make_context
    found = find_instance(config)
    if found.state != "running":
        raise LifecycleError(not_running(config, found))
    endpoints = found.endpoints
    rundir = config.resolved_runtime_dir()
    keys = ClientKeys.read(rundir)  # kvbm-workers answers only peers that can read its 0600 folder
    if keys is None:
        raise LifecycleError(f"kvbm-workers of instance {config.instance_id} left no client keys in {rundir}")
    ctx = make_context()
    sock = connect_socket(ctx, zmq.DEALER, endpoints.control, keys)
    try:
        sock.send(P.encode({"t": P.MsgType.STATUS, "id": 1}))
        if not sock.poll(int(timeout * 1000)):
            raise KvbmTimeoutError(f"kvbm-workers at {endpoints.control} did not answer within {timeout} s")
        return P.decode(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


def not_running(config: KvbmConfig, found) -> str:
    """Why there is no status to ask for, by the state of the instance's lock (launcher.find_instance)."""
    rundir = config.resolved_runtime_dir()
    if found.state == "starting":
        return f"kvbm-workers instance {config.instance_id}: starting (pid {found.pid or '?'})"
    if found.state == "dead":
        return (f"kvbm-workers instance {config.instance_id} (pid {found.pid or '?'}) is dead; its leftovers in "
                f"{rundir} are removed at the next start")
    return f"no running kvbm-workers found for instance {config.instance_id} ({rundir})"


def format_status(st: dict) -> str:
    g2 = st["tiers"]["g2"]
    lines = [f"kvbm-workers instance {st['instance']} pid {st['pid']} up {st['uptime_s']:.0f}s "
             f"mode {'cuda' if st['cuda'] else 'cpu'}",
             f"  G2 {g2['bytes'] / 1e9:.3f} GB segment {g2['segment']} (pre-fault {g2['prefault_s']:.3f}s)",
             *_registry_lines(g2.get("registry")),
             _g3_line(st["tiers"]["g3"])]
    if st["tiers"]["g3"].get("registry"):
        lines += _registry_lines(st["tiers"]["g3"]["registry"], "G3")
    for label, w in st["workers"].items():
        if "state" in w:
            lines.append(f"  {label:7s} {w['state']}")
            continue
        rate = w["bytes"] / 1e9 / w["busy_s"] if w.get("busy_s") else 0.0
        lines.append(f"  {label:7s} gen {w['gen']} pid {w['pid']} {'up' if w['ready'] else 'DOWN'} queue {w['queue']} "
                     f"requests {w['requests']} moved {w['bytes'] / 1e9:.3f} GB copy rate {rate:.2f} GB/s "
                     f"errors {w['errors']} rejected {w['malformed']} restarts {w['restarts']}")
    for name, eng in st.get("engines", {}).items():
        pools = eng.get("pools", {})
        queues = eng.get("queues", {})
        lines.append(f"  engine {name}: pools {json.dumps(pools)} queues {json.dumps(queues)} "
                     f"inflight {eng.get('inflight_bytes', 0)} B")
    return "\n".join(lines)


def _registry_lines(reg: dict | None, tier: str = "G2") -> list[str]:
    """A shared registry (G2's, or G3's slot table): its namespaces (partition, quota, occupancy,
    hits) and engines."""
    if not reg:
        return [f"  {tier} registry: per engine (no shared registry)"]
    if "error" in reg:
        return [f"  {tier} registry {reg['segment']}: {reg['error']}"]
    lines = [f"  {tier} registry {reg['segment']}: {reg['total_blocks']} blocks, {reg['unpartitioned']} in no "
             f"namespace, {len(reg['engines'])} engines, {reg['repairs']} repairs, {reg['reaped']} reaped"]
    for ns in reg["namespaces"]:
        hit = ns["match_hits"] / ns["match_queries"] if ns["match_queries"] else 0.0
        lines.append(f"    namespace {ns['namespace']} {ns['label']}: blocks [{ns['block_offset']}, "
                     f"{ns['block_offset'] + ns['num_blocks']}) quota {ns['num_blocks']}, {ns['engines']} engines, "
                     f"free {ns['free']} inactive {ns['inactive']} active {ns['active']}, hits {ns['match_hits']}/"
                     f"{ns['match_queries']} ({hit:.3f})")
    for e in reg["engines"]:
        retired = e.get("state") == "retired"   # left or dead, its holds kept while a worker holds it
        workers = ",".join(_path_label(p) for p in e.get("workers", [])) or "none"
        lines.append(f"    engine {e['engine_id']} pid {e['pid']}{'' if e['alive'] else ' (gone)'}"
                     f"{' RETIRED' if retired else ''} namespace {e['namespace']}: holds {e['pinned']}, hits "
                     f"{e['match_hits']}/{e['match_queries']}, registered {e['registered']} "
                     f"(+{e['deduplicated']} deduplicated), workers {workers}")
    return lines


def _path_label(path: int) -> str:
    from kvbm.wire import protocol as P  # lazily: `kvbm-workers --help` needs no msgpack (package smoke test)
    try:
        return P.Path(path).label
    except ValueError:
        return str(path)


def _g3_line(g3: dict) -> str:
    """G3 occupancy, journal, throughput and read path, from the disk worker's report."""
    if not g3.get("path"):
        return "  G3 none"
    if not g3.get("open"):
        return f"  G3 {g3['path']} (store not open: {g3.get('error') or 'no engine registered a disk tier yet'})"
    write = g3.get("bytes_written", 0) / 1e9 / g3["write_s"] if g3.get("write_s") else 0.0
    read = g3.get("bytes_read", 0) / 1e9 / g3["read_s"] if g3.get("read_s") else 0.0
    return (f"  G3 {g3['path']} {g3.get('live', 0)}/{g3.get('slots', 0)} blocks, "
            f"journal {g3.get('journal_bytes', 0)} B "
            f"({g3.get('journal_records', 0)} records), written {g3.get('bytes_written', 0) / 1e9:.3f} GB at "
            f"{write:.2f} GB/s, read {g3.get('bytes_read', 0) / 1e9:.3f} GB at {read:.2f} GB/s, "
            f"{g3.get('peer_read', 0)} peer blocks read, {g3.get('checksum_failures', 0)} checksum failures; "
            f"read path {g3.get('read_path', '?')}, GDS {g3.get('gds', '?')}, NIXL POSIX {g3.get('backend', '?')}")


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # first thing: the later it is read, the likelier a dead parent reads as 1
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kvbm-workers %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        logging.getLogger().setLevel(config.log_level)
        if args.status:
            return _status(config, args.json)
        return _serve(config, args, args.parent_pid or parent)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    except KvbmError as err:
        logger.error("%s", err)
        return 1
    except BrokenPipeError:
        _stdout_gone()
        return 0


def _status(config: KvbmConfig, as_json: bool) -> int:
    """The one program result on stdout."""
    from kvbm.transfer.launcher import find_instance
    found = find_instance(config)
    if found.state == "starting":
        print(json.dumps({"instance": config.instance_id, "state": "starting", "pid": found.pid}) if as_json
              else not_running(config, found), flush=True)
        return 3
    st = ask_status(config)
    print(json.dumps(st, indent=2) if as_json else format_status(st), flush=True)
    return 0


def _serve(config: KvbmConfig, args: argparse.Namespace, parent: int) -> int:
    from kvbm.workers.supervisor import Supervisor, install_signal_handlers
    if args.exit_with_parent and os.getppid() != parent:
        logger.error("parent pid %d is gone before start; exiting", parent)
        return 1
    cuda = not config.force_cpu and _cuda_ok()
    host_bytes = host_bytes_of(config)
    if not args.exit_with_parent:   # an engine that starts kvbm-workers checked before it did
        from kvbm.shm import check_shm_room
        from kvbm.transfer.launcher import find_instance
        if find_instance(config).state == "absent":   # else start() refuses, or frees a dead one's segment first
            check_shm_room(host_bytes, "G2")
    sup = Supervisor(config, host_bytes, cuda, interval=args.interval, log_level=config.log_level)
    if args.exit_with_parent:
        # Polled in serve() rather than PR_SET_PDEATHSIG: that fires when the parent *thread*
        # that ran Popen exits, which kills the workers of a live engine that started us from a
        # short-lived thread.
        sup.parent_pid = parent
    sup.idle_exit_s = float(args.exit_when_idle or 0)
    if not 1 <= args.g2_ranks <= 1024:
        logger.error("--g2-ranks %d: expected 1..1024", args.g2_ranks)
        return 2
    sup.g2_ranks = args.g2_ranks
    install_signal_handlers(sup)
    if args.metrics_port:
        from kvbm.metrics import serve
        serve(sup.metrics.registry, args.metrics_port)
    t0 = time.perf_counter()
    sup.start()  # on failure it has cleaned up what it made, and never touches another owner's files
    try:
        logger.info("instance %s serving (%s mode) at %s; started in %.2f s", config.instance_id,
                    "cuda" if cuda else "cpu", sup.endpoints.control, time.perf_counter() - t0)
        sup.serve(args.duration)
    finally:
        sup.shutdown()
        logger.info("instance %s stopped", config.instance_id)
    return 0


def _stdout_gone() -> None:
    """stdout's reader went away (`| head -1`): point stdout at /dev/null so that the interpreter's
    final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _cuda_ok() -> bool:
    import kvbm
    return kvbm.cuda_available()


if __name__ == "__main__":
    sys.exit(main())
