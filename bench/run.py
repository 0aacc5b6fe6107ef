"""SecretFS benchmarks, each figure beside the limits of the same machine in the same run.

    python bench/run.py [--runs N] [--json PATH] [--only SECTION,...]

Needs root and /dev/fuse, gcc and libfuse3 headers (for the C yardstick and
the reader). Prints a table and writes the same figures as JSON. Each figure
is the median over N runs of the whole suite.

1. Publish and unpublish latency, p50 and p99 over 300 volumes, one at a
   time and 16 at a time, against the stand-in API server over HTTPS on
   loopback. Calls go over one kept-open gRPC channel, so the figures are
   the driver's own cost, not the client's connection set-up. Beside them,
   what the parts of a publish cost on their own, in the same run: a gRPC
   call that does nothing (NodeGetInfo), a GET of the Secret by the driver's
   own HTTPS client, and a mkdir of a target beside the publishes' own (what
   each would pay without the directories the driver makes ahead).
2. Reads: open+read+close of a 64-byte and a 4 KiB secret by 1 and 2 reader
   processes (a C loop, inside the pod's cgroup: pod binding is on), on
   the product, on tmpfs, and on bench/minifuse.c, a minimal C libfuse
   server with the product's semantics.
3. Memory: RSS after start, and RSS growth per volume over 1000 volumes of
   3 KiB each beyond the 3 KiB itself.
4. Rotation: Secret updated in the API, republished, new bytes readable:
   p50 and p99 over 50 updates.
5. Fairness: publish p99 while another pod reads its secret in a tight loop,
   against the same without the reader.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The client's own notices (an idle connection closed, say) are not results.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


from secretfs.csi.kube import SecretReader, connect  # noqa: E402
from secretfs.csi.pb import csi_pb2  # noqa: E402
from secretfs.fs.buffer import SecretBuffer  # noqa: E402
from tests.conftest import make_workdir, remove_workdir  # noqa: E402
from tests.fakeapi import FakeKubeAPI  # noqa: E402
from tests.harness import Driver, Kubelet, in_pod_command, pod_cgroup, remove_test_cgroups  # noqa: E402

READ_SECONDS = 2.0

# The tmpfs yardstick reads a file here, the one tmpfs every Linux has.
SHM = Path("/dev/shm")  # noqa: S108 - a file of our own, removed after use


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
    }


class Bench:
    def __init__(self, tools: Path, parent: str) -> None:
        self.tools = tools
        self.workdir = make_workdir(parent)
        self.api = FakeKubeAPI(self.workdir / "api").start()
        account = "system:serviceaccount:bench:default"
        self.token = self.api.add_user(account)
        self.api.grant(account, "bench", "get")
        driver_token = self.api.add_user("system:serviceaccount:secretfs:secretfs-node")
        self.kubeconfig = self.api.write_kubeconfig(self.workdir / "kubeconfig", driver_token)

    def close(self) -> None:
        self.api.stop()
        remove_workdir(self.workdir)
        remove_test_cgroups()

    def driver(self, name: str) -> Driver:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        folder.chmod(0o755)
        driver = Driver(folder, self.kubeconfig, tokens=lambda ns, sa: self.token)
        return driver.start()

    # ---- 1. publish ------------------------------------------------------

    def publish_latency(self) -> dict[str, Any]:
        self.api.set_secret("bench", "db", {"password": b"p" * 64, "user": b"u" * 16})
        driver = self.driver("publish")
        try:
            kubelet = Kubelet(driver, namespace="bench")
            node = driver.node
            serial = [kubelet.volume("db") for _ in range(300)]
            # The mkdir floor is taken between publishes, in pod folders beside
            # theirs: what a mkdir costs here depends on the filesystem's state.
            beside = [kubelet.volume("db") for _ in range(300)]
            publish, mkdirs = [], []
            for volume, other in zip(serial, beside, strict=True):
                mkdirs.append(timed_mkdir(other.target))
                publish.append(timed(node.NodePublishVolume, volume.request))
            unpublish = [timed(node.NodeUnpublishVolume, unpublish_request(v)) for v in serial]
            noop = [timed(node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()) for _ in range(300)]
            parallel = [kubelet.volume("db") for _ in range(300)]
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                concurrent_publish = list(
                    pool.map(lambda v: timed(node.NodePublishVolume, v.request), parallel)
                )
                list(
                    pool.map(
                        lambda v: timed(node.NodeUnpublishVolume, unpublish_request(v)), parallel
                    )
                )
        finally:
            driver.close()
        return {
            "publish_serial": ms(publish),
            "publish_16_concurrent": ms(concurrent_publish),
            "unpublish_serial": ms(unpublish),
            "floor_grpc_noop": ms(noop),
            "floor_api_get": ms(self.api_gets(300)),
            "floor_mkdir_target": ms(mkdirs),
        }

    def api_gets(self, count: int) -> list[float]:
        client, credentials = connect(str(self.kubeconfig))
        reader = SecretReader(client, credentials)
        token = SecretBuffer.from_bytes(f"Bearer {self.token}".encode())
        latencies = []
        try:
            for _ in range(count):
                start = time.perf_counter()
                buffers = reader.read("bench", "db", token)
                latencies.append(time.perf_counter() - start)
                for buffer in buffers.values():
                    buffer.wipe()
        finally:
            token.wipe()
            client.close()
        return latencies

    # ---- 2. reads --------------------------------------------------------

    def reads(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        driver = self.driver("reads")
        minifuse_dirs = []
        try:
            kubelet = Kubelet(driver, namespace="bench")
            for size in (64, 4096):
                label = f"{size}B"
                self.api.set_secret("bench", f"s{size}", {"k": b"x" * size})
                volume = kubelet.volume(f"s{size}")
                kubelet.publish(volume)
                tmpfs_file = SHM / f"secretfs-bench-{size}"
                tmpfs_file.write_bytes(b"x" * size)
                mountpoint = Path(tempfile.mkdtemp(prefix="secretfs-minifuse-"))
                minifuse_dirs.append(mountpoint)
                server = subprocess.Popen(
                    [str(self.tools / "minifuse"), str(mountpoint), str(size)]
                )
                wait_for_file(mountpoint / "secret")
                try:
                    for readers in (1, 2):
                        product = self.read_rate(volume.target / "k", readers, volume.pod_uid)
                        c_server = self.read_rate(mountpoint / "secret", readers)
                        tmpfs = self.read_rate(tmpfs_file, readers)
                        results[f"{label}_{readers}_readers"] = {
                            "product_ops": product,
                            "c_libfuse_ops": c_server,
                            "tmpfs_ops": tmpfs,
                            "product_to_c": round(product / c_server, 3),
                            "product_to_tmpfs": round(product / tmpfs, 5),
                        }
                finally:
                    subprocess.run(["umount", str(mountpoint)], check=False)
                    server.wait(10)
                    tmpfs_file.unlink()
                kubelet.unpublish(volume)
        finally:
            driver.close()
            for folder in minifuse_dirs:
                shutil.rmtree(folder, ignore_errors=True)
        return results

    def read_rate(self, path: Path, readers: int, pod: str | None = None) -> int:
        command = [str(self.tools / "readloop"), str(path), str(READ_SECONDS)]
        if pod is not None:
            command = in_pod_command(pod, command)
        loops = [
            subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(readers)
        ]
        total = 0
        for loop in loops:
            out, _ = loop.communicate(timeout=60)
            if loop.returncode != 0:
                raise RuntimeError(f"reader failed on {path}")
            total += int(out)
        return total

    # ---- 3. memory -------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        self.api.set_secret("bench", "three", {"k": os.urandom(3072)})
        driver = self.driver("memory")
        try:
            assert driver.process is not None
            time.sleep(1.0)
            idle = rss_kib(driver.process.pid)
            kubelet = Kubelet(driver, namespace="bench")
            volumes = [kubelet.volume("three") for _ in range(1000)]
            for volume in volumes:
                driver.node.NodePublishVolume(volume.request)
            loaded = rss_kib(driver.process.pid)
            for volume in volumes:
                driver.node.NodeUnpublishVolume(unpublish_request(volume))
        finally:
            driver.close()
        per_volume = (loaded - idle) / 1000
        return {
            "idle_rss_mib": round(idle / 1024, 1),
            "rss_per_volume_kib": round(per_volume, 2),
            "rss_per_volume_beyond_data_kib": round(per_volume - 3, 2),
        }

    # ---- 4. rotation -----------------------------------------------------

    def rotation(self) -> dict[str, Any]:
        self.api.set_secret("bench", "rot", {"k": b"v0"})
        driver = self.driver("rotation")
        latencies = []
        try:
            kubelet = Kubelet(driver, namespace="bench")
            volume = kubelet.volume("rot")
            kubelet.publish(volume)
            path = volume.target / "k"
            with open(pod_cgroup(volume.pod_uid) / "cgroup.procs", "w") as procs:
                procs.write(str(os.getpid()))
            try:
                for i in range(1, 51):
                    want = f"v{i}".encode()
                    start = time.perf_counter()
                    self.api.set_secret("bench", "rot", {"k": want})
                    driver.node.NodePublishVolume(volume.request)  # the kubelet's republish
                    while path.read_bytes() != want:
                        time.sleep(0.0005)
                    latencies.append(time.perf_counter() - start)
            finally:
                with open(cgroup_root() / "cgroup.procs", "w") as procs:
                    procs.write(str(os.getpid()))
            kubelet.unpublish(volume)
        finally:
            driver.close()
        return {"write_to_readable": ms(latencies)}

    # ---- 5. fairness -----------------------------------------------------

    def fairness(self) -> dict[str, Any]:
        self.api.set_secret("bench", "fair", {"k": b"f" * 64})
        driver = self.driver("fairness")
        try:
            kubelet = Kubelet(driver, namespace="bench")
            reader_volume = kubelet.volume("fair")
            kubelet.publish(reader_volume)
            quiet = self.publish_round(driver, kubelet)
            command = [str(self.tools / "readloop"), str(reader_volume.target / "k"), "30"]
            reader = subprocess.Popen(
                in_pod_command(reader_volume.pod_uid, command), stdout=subprocess.DEVNULL
            )
            try:
                time.sleep(0.5)
                busy = self.publish_round(driver, kubelet)
            finally:
                reader.kill()
                reader.wait()
            kubelet.unpublish(reader_volume)
        finally:
            driver.close()
        return {
            "publish_p99_ms_quiet": round(percentile(quiet, 99) * 1000, 3),
            "publish_p99_ms_with_reader": round(percentile(busy, 99) * 1000, 3),
            "p99_increase_ms": round((percentile(busy, 99) - percentile(quiet, 99)) * 1000, 3),
        }

    def publish_round(self, driver: Driver, kubelet: Kubelet) -> list[float]:
        volumes = [kubelet.volume("fair") for _ in range(100)]
        latencies = [timed(driver.node.NodePublishVolume, v.request) for v in volumes]
        for volume in volumes:
            driver.node.NodeUnpublishVolume(unpublish_request(volume))
        return latencies


def timed(call: Callable[..., Any], request: Any) -> float:
    start = time.perf_counter()
    call(request, timeout=60)
    return time.perf_counter() - start


def timed_mkdir(path: Path) -> float:
    start = time.perf_counter()
    path.mkdir(0o750)
    return time.perf_counter() - start


def unpublish_request(volume: Any) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=str(volume.target)
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cgroup_root() -> Path:
    from tests.harness import cgroup2_root

    return cgroup2_root()


def wait_for_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def build_tools(into: Path) -> None:
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()
    here = Path(__file__).parent
    subprocess.run(
        ["gcc", "-O2", "-o", str(into / "minifuse"), str(here / "minifuse.c"), *flags], check=True
    )
    subprocess.run(
        ["gcc", "-O2", "-o", str(into / "readloop"), str(here / "readloop.c")], check=True
    )


def median_of(runs: list[Any]) -> Any:
    """The median, figure by figure, of several runs' nested results."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs]) for key in first}
    if isinstance(first, int | float):
        return round(statistics.median(runs), 3)
    return first


def table(results: dict[str, Any]) -> str:
    lines = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            lines.append(f"| {prefix} | {value} |")

    walk("", results["figures"])
    return "\n".join(["| figure | value |", "|---|---|", *lines])


SECTIONS = ("publish", "reads", "memory", "rotation", "fairness")


def _sections(text: str) -> list[str]:
    chosen = text.split(",")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections: {', '.join(sorted(unknown))}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the suite (default 3)")
    parser.add_argument(
        "--json", help="where to write the figures (default: bench/results.json for a full run)"
    )
    parser.add_argument(
        "--only",
        type=_sections,
        help=f"comma-separated sections, of: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--workdir",
        default="/var/lib",
        help="where the stand-in kubelet folder goes (default: %(default)s, beside the "
        "kubelet's own): making a target directory is part of every publish, and its cost "
        "depends on the filesystem and the folder",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmarks mount FUSE filesystems: run them as root", file=sys.stderr)
        return 2
    tools = Path(tempfile.mkdtemp(prefix="secretfs-bench-tools-"))
    build_tools(tools)
    bench = Bench(tools, args.workdir)
    runs = []
    try:
        for run in range(args.runs):
            print(f"run {run + 1} of {args.runs}", file=sys.stderr, flush=True)
            sections = {
                "publish": bench.publish_latency,
                "reads": bench.reads,
                "memory": bench.memory,
                "rotation": bench.rotation,
                "fairness": bench.fairness,
            }
            runs.append({name: sections[name]() for name in args.only or SECTIONS})
    finally:
        bench.close()
        shutil.rmtree(tools, ignore_errors=True)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "runs": args.runs,
        "workdir": args.workdir,
        "figures": median_of(runs),
    }
    output = args.json or (None if args.only else ROOT / "bench" / "results.json")
    if output is not None:
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
    runs_text = "1 run" if args.runs == 1 else f"median of {args.runs} runs"
    print(f"{results['date']}, {results['machine']}, {runs_text}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
