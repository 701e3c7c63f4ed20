#!/usr/bin/env python3
"""The benchmark suite of image-worker: each section measures the worker and its baseline side by
side, in the same run, on the same images, and prints a Markdown table of medians and ratios.

Run through bench/run.sh (which brings up the services, the fixtures and a release build):
    bench/run.sh                      every section
    bench/run.sh discovery memory     some sections
Sections: discovery, pull, build, throughput, scaleout, memory, startup.
Environment: IW_BENCH_RUNS (runs per measurement, default 5), IW_BENCH_OUT (also append the
tables to this file).
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release", "image-worker")
JOBLOAD = os.path.join(TARGET, "release", "examples", "jobload")
CONFIG = os.path.join(ROOT, "config", "image-worker.yaml")
RUNS = int(os.environ.get("IW_BENCH_RUNS", "5"))
OUT = os.environ.get("IW_BENCH_OUT")
REGISTRY = "127.0.0.1:5000"
LARGE = f"{REGISTRY}/fixtures/large:latest"
BASIC = f"{REGISTRY}/fixtures/basic:latest"
BASE_TEMPLATE = f"{REGISTRY}/base/python:{{python}}-slim"
SCRATCH = tempfile.mkdtemp(prefix="iw-bench-")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def emit(text=""):
    print(text, flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(text + "\n")


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def quiet(cmd, **kw):
    return run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def timed(cmd, **kw):
    """Seconds one command takes (its output discarded)."""
    started = time.perf_counter()
    quiet(cmd, **kw)
    return time.perf_counter() - started


def median(xs):
    return statistics.median(xs)


def fmt_s(x):
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def table(header, rows):
    emit("| " + " | ".join(header) + " |")
    emit("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        emit("| " + " | ".join(str(c) for c in row) + " |")
    emit()


def machine():
    engine = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"],
        capture_output=True, text=True).stdout.strip()
    driver = subprocess.run(["docker", "info", "--format", "{{.Driver}}"],
                            capture_output=True, text=True).stdout.strip()
    rabbit = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True,
                            text=True).stdout.strip()
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB; "
            f"Docker engine {engine}, storage driver {driver}; RabbitMQ {rabbit}; "
            f"medians of {RUNS} runs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


# ---- a worker process ------------------------------------------------------------------------

class Worker:
    """`image-worker run` with its own AMQP prefix, logs root and HTTP port; `ready` is the
    systemd READY=1 notification (sent once it consumes)."""

    def __init__(self, prefix, concurrency=4, env=None, wait=True):
        self.prefix = prefix
        self.dir = tempfile.mkdtemp(prefix="worker-", dir=SCRATCH)
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.port = free_port()
        environ = dict(os.environ)
        environ.update({
            "IMAGE_WORKER__AMQP__PREFIX": prefix,
            "IMAGE_WORKER__LOGS__ROOT": os.path.join(self.dir, "logs"),
            "IMAGE_WORKER__HTTP__LISTEN": f"127.0.0.1:{self.port}",
            "IMAGE_WORKER__WORKER__CONCURRENCY": str(concurrency),
            "IMAGE_WORKER__WORKER__GROUP": "general",
            "IMAGE_WORKER__BUILD__BASE_IMAGE_TEMPLATE": BASE_TEMPLATE,
            "NOTIFY_SOCKET": self.notify_path,
        })
        environ.update(env or {})
        self.log_path = os.path.join(self.dir, "worker.log")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([BIN, "run", "--config", CONFIG], env=environ,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.ready_after = None
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=30):
        self.notify.settimeout(timeout)
        while True:
            msg = self.notify.recv(4096).decode()
            if "READY=1" in msg:
                self.ready_after = time.perf_counter() - self.started
                return self.ready_after

    def readyz(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self, key):
        """A `VmRSS`/`VmHWM` line of /proc/PID/status, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        delete_topology(self.prefix)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def delete_topology(prefix):
    """Removes a benchmark prefix's queues (exchanges are left: they hold nothing)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True,
                         text=True).stdout.split()
    for name in out:
        if name.startswith(prefix + "."):
            quiet(["rabbitmqctl", "-q", "delete_queue", name], check=False)


def jobload(prefix, count, job, *extra):
    out = run([JOBLOAD, "--prefix", prefix, "--count", str(count), "--job", json.dumps(job),
               *extra], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pull_job(image_name, **fields):
    job = {"type": "pull", "group": "bench", "name": image_name, "tag": "latest",
           "push_url": REGISTRY, "pin_version": True, "discover": False}
    job.update(fields)
    return job


def unique(name):
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


def ensure_image(ref):
    if subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode:
        quiet(["docker", "pull", ref])


def remove_image(ref):
    """Removes the image and every other tag of it, so that its layers are gone too."""
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref],
                              capture_output=True, text=True).stdout.strip()
    if image_id:
        quiet(["docker", "image", "rm", "-f", image_id], check=False)
        # The removal's writeback is not charged to whatever runs next.
        quiet(["sync"])


# ---- 1. discovery ----------------------------------------------------------------------------

BUILDER_SCAN = os.path.join(ROOT, "bench", "builder_scan.py")


def bench_discovery():
    ensure_image(LARGE)
    container = run(["docker", "create", "--network", "none", LARGE, "/nonexistent"],
                    capture_output=True, text=True).stdout.strip()
    counts = {}
    try:
        def raw():
            return timed(["sh", "-c", f"docker cp {container}:/pyats - > /dev/null"])

        def worker(source):
            def go():
                started = time.perf_counter()
                out = run([BIN, "discover", LARGE, "--source", source, "--config", CONFIG],
                          capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"})
                elapsed = time.perf_counter() - started
                found = json.loads(out.stdout)
                counts[source] = (len(found["jobs"]), len(found["manifests"]), found["source"])
                return elapsed
            return go

        def builder():
            out = run([sys.executable, BUILDER_SCAN, container, "/pyats"], capture_output=True,
                      text=True)
            result = json.loads(out.stdout)
            counts["builder"] = (len(result["jobs"]), result["files_read"], "extract")
            return result["seconds"]

        cases = [("raw stream: docker cp CONTAINER:/pyats - > /dev/null", raw),
                 ("image-worker discover --source archive", worker("archive")),
                 ("image-worker discover --source layers", worker("layers")),
                 ("image-worker discover --source auto", worker("auto")),
                 ("extract-then-scan (pyats-image-builder style, bench/builder_scan.py)", builder)]
        times = {name: [] for name, _ in cases}
        for name, fn in cases:  # one warm-up each: every case reads from the page cache
            fn()
        for _ in range(RUNS):  # interleaved, so drift hits every case alike
            for name, fn in cases:
                times[name].append(fn())
    finally:
        quiet(["docker", "rm", "-f", container], check=False)
    raw_median = median(times[cases[0][0]])
    builder_median = median(times[cases[-1][0]])
    files = subprocess.run(["docker", "run", "--rm", "--entrypoint", "/bin/sh", LARGE, "-c",
                            "find /pyats -type f | wc -l"], capture_output=True,
                           text=True).stdout.strip()
    size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", LARGE],
                          capture_output=True, text=True).stdout.strip()
    emit(f"### 1. Discovery on the large fixture ({LARGE}: {files} files under /pyats, "
         f"{int(size) / 1e6:.0f} MB)")
    emit()
    rows = []
    for name, _ in cases:
        m = median(times[name])
        rows.append([name, fmt_s(m), f"{m / raw_median:.3f}", f"{m / builder_median:.3f}"])
    table(["what", "median", "÷ raw stream", "÷ extract-then-scan"], rows)
    emit(f"Found: {', '.join(f'{k}: {v[0]} jobs' for k, v in counts.items())}; "
         f"sources that ran: {', '.join(f'{k}→{v[2]}' for k, v in counts.items())}. "
         "Targets: archive ≤ 1.15 × raw stream; layers and auto ≤ 0.25 × raw stream.")
    emit()


# ---- 2. pull job end to end ------------------------------------------------------------------

def bench_pull():
    prefix = unique("pull")
    worker = Worker(prefix, concurrency=1)
    rows = []
    try:
        for ref, runs in ((BASIC, RUNS * 2), (LARGE, max(4, RUNS // 2 + 1))):
            name = ref.split("/", 1)[1].rsplit(":", 1)[0]

            def cli():
                remove_image(ref)
                started = time.perf_counter()
                quiet(["docker", "pull", ref])
                quiet(["docker", "image", "inspect", ref])
                return time.perf_counter() - started

            def job(discover):
                def go():
                    remove_image(ref)
                    result = jobload(prefix, 1, pull_job(name, pin_version=False,
                                                         discover=discover))
                    assert result["statuses"] == {"successful": 1}, result
                    return result["seconds"]
                return go

            cases = [("docker pull + docker inspect", cli),
                     ("pull job over AMQP, discover: false", job(False)),
                     ("pull job over AMQP, discover: true", job(True))]
            times = {n: [] for n, _ in cases}
            # ABBA order: on this disk every pull of a large image is slower than the one
            # before it, whoever pulls, so no case may always go first.
            for r in range(runs):
                for n, fn in (cases if r % 2 == 0 else cases[::-1]):
                    times[n].append(fn())
            base = median(times[cases[0][0]])
            for n, _ in cases:
                m = median(times[n])
                rows.append([ref, n, runs, fmt_s(m), f"{m / base:.3f}",
                             f"{min(times[n]):.3f}–{max(times[n]):.3f} s"])
    finally:
        worker.stop()
        ensure_image(BASIC)
        ensure_image(LARGE)
    emit("### 2. Pull job end to end (image removed before each run, every tag of it; "
         "publish → final report)")
    emit()
    table(["image", "what", "runs", "median", "÷ docker pull + inspect", "range"], rows)
    emit("Target: discover: false ≤ 1.10 × the CLI. The difference between the two job rows is "
         "what discovery adds.")
    emit()


# ---- 3. build job ----------------------------------------------------------------------------

def make_wheel(directory):
    """A pure-Python wheel, so the build really runs pip install (containers have no internet)."""
    import base64
    import hashlib
    import zipfile
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "iwbench-1.0-py3-none-any.whl")
    files = {
        "iwbench/__init__.py": "VALUE = 'bench'\n",
        "iwbench-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: iwbench\nVersion: 1.0\n",
        "iwbench-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(text)}")
        record.append("iwbench-1.0.dist-info/RECORD,,")
        z.writestr("iwbench-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def bench_build():
    ensure_image(BASE_TEMPLATE.format(python="3.11"))
    files_dir = os.path.join(SCRATCH, "build-files")
    wheel = make_wheel(files_dir)
    job_py = os.path.join(files_dir, "bench_job.py")
    with open(job_py, "w") as f:
        f.write("def main(runtime):\n    pass\n")
    yaml_content = (
        "python: '3.11'\n"
        "env: {BENCH: '1'}\n"
        f"files: [{{wheels/{os.path.basename(wheel)}: {wheel}}}, {{jobs/bench_job.py: {job_py}}}]\n"
        f"packages: [/pyats/wheels/{os.path.basename(wheel)}]\n"
        "cmds: {post: 'python -c \"import iwbench\"'}\n"
    )
    prefix = unique("build")
    worker = Worker(prefix, concurrency=1,
                    env={"IMAGE_WORKER__BUILD__FILES_ALLOW": f"[{files_dir}]"})
    name, tag = "bench/build", "1.0"
    ref = f"{REGISTRY}/{name}:{tag}"
    job = {"type": "build", "group": "bench", "name": name, "tag": tag, "push_url": REGISTRY,
           "yaml_content": yaml_content, "discover": False}
    try:
        remove_image(ref)
        started = time.perf_counter()
        first = jobload(prefix, 1, job)
        uncached = time.perf_counter() - started
        assert first["statuses"] == {"successful": 1}, first
        # The CLI's context: the same workspace, read back out of the built image.
        ctx = os.path.join(SCRATCH, "cli-context")
        os.makedirs(ctx)
        run(["sh", "-c", f"c=$(docker create {ref} /x) && docker cp $c:/pyats {ctx}/workspace"
                         f" && docker rm $c >/dev/null"], stdout=subprocess.DEVNULL)
        cli_ref = f"{REGISTRY}/bench/build-cli:{tag}"
        cli_build = ["docker", "build", "-q", "-f",
                     os.path.join(ctx, "workspace/installation/Dockerfile"), "-t", cli_ref, ctx]
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the legacy builder, as the worker uses

        def cli():
            return timed(cli_build, env=env)

        def cli_push():
            started = time.perf_counter()
            quiet(cli_build, env=env)
            quiet(["docker", "push", cli_ref])
            return time.perf_counter() - started

        def worker_job():
            result = jobload(prefix, 1, job)
            assert result["statuses"] == {"successful": 1}, result
            return result["seconds"]

        cases = [("docker build (legacy builder), cached", cli),
                 ("docker build + docker push, cached", cli_push),
                 ("build job over AMQP (build, push, inspect; discover: false), cached", worker_job)]
        times = {n: [] for n, _ in cases}
        for _, fn in cases:
            fn()
        for _ in range(RUNS):
            for n, fn in cases:
                times[n].append(fn())
    finally:
        worker.stop()
    base = median(times[cases[0][0]])
    with_push = median(times[cases[1][0]])
    emit("### 3. Build job: cached rebuild of the test image (a wheel installed with pip, a job "
         "file, env, cmds.post)")
    emit()
    rows = [[n, fmt_s(median(times[n])), f"{median(times[n]) / base:.3f}",
             f"{median(times[n]) / with_push:.3f}"] for n, _ in cases]
    table(["what", "median", "÷ docker build", "÷ docker build + push"], rows)
    emit(f"Uncached build job (first build of the image, pip install included): {fmt_s(uncached)}. "
         "Target: cached build job ≤ 1.10 × docker build.")
    emit()


# ---- 4 and 5. draining a backlog of cache-hit jobs -------------------------------------------

def pids_of(name):
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == name:
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def cpu_seconds(pids):
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def drain(count, job, workers=1, concurrency=4):
    """Queues `count` jobs, then starts `workers` processes and times them from the first
    worker's READY=1 to the last report. Returns (jobs/s, seconds, jobs per worker, CPU
    seconds by process: workers, dockerd, RabbitMQ)."""
    prefix = unique("drain")
    reply = f"{prefix}.replies"
    jobload(prefix, count, job, "--queue-only", "--reply-queue", reply)
    collector = subprocess.Popen(
        [JOBLOAD, "--prefix", prefix, "--count", str(count), "--collect-only", "--reply-queue",
         reply], stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)  # the collector is consuming before the first worker starts
    engine, broker = pids_of("dockerd"), pids_of("beam.smp")
    cpu_before = (cpu_seconds(engine), cpu_seconds(broker))
    procs = [Worker(prefix, concurrency=concurrency, wait=False) for _ in range(workers)]
    procs[0].wait_ready()
    ready_at = time.time() - (time.perf_counter() - procs[0].started - procs[0].ready_after)
    out, _ = collector.communicate(timeout=900)
    cpu = {"workers": sum(cpu_seconds([w.proc.pid]) for w in procs),
           "dockerd": cpu_seconds(engine) - cpu_before[0],
           "rabbitmq": cpu_seconds(broker) - cpu_before[1]}
    for w in procs:
        w.stop()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lost"] == 0 and result["duplicates"] == 0, result
    assert result["statuses"] == {"successful": count}, result
    taken = [open(w.log_path).read().count("report published") for w in procs]
    assert sum(taken) == count, taken
    seconds = result["last_report_unix"] - ready_at
    return count / seconds, seconds, taken, cpu


def cpu_cell(cpu, seconds):
    return ", ".join(f"{k} {v / seconds * 100:.0f}%" for k, v in cpu.items())


def bench_throughput():
    ensure_image(BASIC)
    rows = []
    for discover, count in ((False, 2000), (True, 1000)):
        for concurrency in (1, 4, 16):
            runs = [drain(count, pull_job("fixtures/basic", discover=discover), 1, concurrency)
                    for _ in range(max(1, RUNS // 2))]
            mid = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            rows.append([f"discover: {str(discover).lower()}", concurrency, count,
                         f"{mid[0]:.0f}", fmt_s(mid[1]), cpu_cell(mid[3], mid[1])])
    emit(f"### 4. Throughput of cache-hit pull jobs ({BASIC}, pin_version: true, one worker, "
         "a queued backlog; from READY=1 to the last report)")
    emit()
    table(["discovery", "concurrency", "jobs", "jobs/s (median run)", "time",
           "CPU busy (of one core) during the run"], rows)
    emit("Target: ≥ 200 jobs/s with discovery off. Every run: 0 lost, 0 duplicates.")
    emit()


def bench_scaleout():
    ensure_image(BASIC)
    count = 2000
    rows = []
    base = None
    for workers in (1, 2, 4):
        runs = [drain(count, pull_job("fixtures/basic"), workers, 4)
                for _ in range(max(1, RUNS // 2))]
        mid = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        base = base or mid[0]
        rows.append([workers, count, fmt_s(mid[1]), f"{mid[0]:.0f}", f"{mid[0] / base:.2f}",
                     "/".join(str(n) for n in mid[2]), cpu_cell(mid[3], mid[1])])
    emit(f"### 5. Scale-out: {count} queued cache-hit jobs drained by 1, 2 and 4 worker processes "
         "(concurrency 4 each; from the first worker's READY=1 to the last report)")
    emit()
    table(["workers", "jobs", "time", "jobs/s (median run)", "× one worker", "jobs per worker",
           "CPU busy (of one core) during the run"], rows)
    emit("Every run: each job reported exactly once (0 lost, 0 duplicates, the workers' "
         "'report published' lines add up to the jobs).")
    emit()


# ---- 6. memory -------------------------------------------------------------------------------

def bench_memory():
    ensure_image(LARGE)
    prefix = unique("mem")
    idle = Worker(prefix, concurrency=2)
    time.sleep(3)
    idle_rss = idle.status("VmRSS")
    idle.stop()
    rows = [["idle (connected, consuming, after 3 s)", f"{idle_rss / 1024:.1f} MiB", "≤ 15 MiB"]]
    for source in ("layers", "archive"):
        prefix = unique("mem")
        worker = Worker(prefix, concurrency=8,
                        env={"IMAGE_WORKER__DISCOVERY__SOURCE": source})
        try:
            result = jobload(prefix, 8, pull_job("fixtures/large", discover=True))
            assert result["statuses"] == {"successful": 8}, result
            peak = worker.status("VmHWM")
        finally:
            worker.stop()
        rows.append([f"peak, 8 discoveries of the large image at once ({source} source, "
                     f"{result['seconds']:.1f} s)", f"{peak / 1024:.1f} MiB", "≤ 64 MiB"])
    emit("### 6. Memory of the worker process (resident set: VmRSS idle, VmHWM peak)")
    emit()
    table(["what", "resident", "target"], rows)


# ---- 7. start-up -----------------------------------------------------------------------------

def bench_startup():
    ready, readyz = [], []
    for _ in range(max(RUNS, 10)):
        prefix = unique("start")
        worker = Worker(prefix, concurrency=2, wait=False)
        try:
            ready.append(worker.wait_ready())
            while not worker.readyz():
                time.sleep(0.002)
            readyz.append(time.perf_counter() - worker.started)
        finally:
            worker.stop()
    emit("### 7. Start-up: process start to ready (broker and engine up)")
    emit()
    table(["what", "median", "max", "target"],
          [["to READY=1 (systemd notify: consuming)", f"{median(ready) * 1000:.0f} ms",
            f"{max(ready) * 1000:.0f} ms", "≤ 300 ms"],
           ["to /readyz 200", f"{median(readyz) * 1000:.0f} ms", f"{max(readyz) * 1000:.0f} ms",
            ""]])


SECTIONS = {
    "discovery": bench_discovery,
    "pull": bench_pull,
    "build": bench_build,
    "throughput": bench_throughput,
    "scaleout": bench_scaleout,
    "memory": bench_memory,
    "startup": bench_startup,
}


def main():
    wanted = sys.argv[1:] or list(SECTIONS)
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    emit(f"Machine: {machine()}")
    emit()
    try:
        for name in wanted:
            log(f"{name} ...")
            started = time.time()
            SECTIONS[name]()
            log(f"{name} done in {time.time() - started:.0f} s")
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
