"""Load test (issue 7): light RPCs at high concurrency while heavy work runs, against a real server.

Starts `python -m kinship_service` as a subprocess on loopback (KINSHIP_PORT=0) over a fresh
work directory, then drives it with grpc.aio:

- light load: `--clients` concurrent clients (coroutines over `--channels` HTTP/2 channels),
  each looping over FINGERPRINT Kinship between two registered checkpoints (random pair) and
  ShouldStop over a population whose kinship values are given (`known_kinship`), half each;
- heavy load in the background for the whole window: two loops of cold EXACT Kinship (each
  iteration touches one of its model files first, so its identity changes and the pass reads
  every byte again instead of answering from the cache), and one loop of SLERP merges
  (StartMerge, watch until done, again with overwrite).

A warm-up (`--warmup`, 3 s) runs the light load unrecorded while the heavy work starts (channels
connect, the server loads fingerprints); then the recorded window opens. Bounded in time
(`--duration`) and in count (`--max-requests` light calls). Prints throughput,
p50/p99 latency per RPC, errors by status code (light and heavy separately), how much heavy work
ran during the window, the server's CPU time and peak RSS (VmHWM), per process when it runs
a heavy-work process, light calls per CPU-second of the front (its CPU time over the recorded
window: the figure that decides how many calls one front can take, whatever else loads the
machine), the processor's model name and the load average before and after. Targets (issue 7):
light calls >= 1,000 req/s in total with p99 < 50 ms, and no errors other than RESOURCE_EXHAUSTED on the heavy path. The default offered rate, 1,100
calls/s, is 10% above the target so that the achieved rate shows it with room (an open-loop
window always ends a few calls short of rate x duration).

The light requests are built and serialised before any timing and sent as bytes, and the load
generator's heap is frozen out of the garbage collector: its own pauses would otherwise be
charged to the server as latency (they were, in the figures of docs/reliability.md before 23 Nov).

    python bench/load.py                          # 64 clients, 1,100 calls/s, 20 s, heavy models of 4e7 parameters
    python bench/load.py --duration 60 --json out.json
    python bench/load.py --server-env KINSHIP_HEAVY_SCHEDULING=nice   # heavy threads on nice values only (A/B)
    python bench/load.py --loadgen-nice 5         # the generator yields the cores to the server (clients elsewhere)

It also prints how long the front's event loop waited runnable for a CPU in the window
(schedstat), how the heavy threads were scheduled and how often the starvation guard stepped in.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from _server import (  # bench/ is the script's directory
    cpu_seconds,
    metric_value,
    proc_status,
    run_queue_wait_seconds,
    server_pids,
    start_server,
)

ROOT = Path(__file__).resolve().parent.parent


def processor_name() -> str:
    """The processor's model name (/proc/cpuinfo), or the platform's description elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def free_port() -> int:
    """A free loopback TCP port (the server's metrics endpoint, read once at the end)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- data -------------------------------------------------------------------------------------
def make_data(work: Path, n_light: int, heavy_params: float) -> dict[str, object]:
    import torch

    from kinship_service.checkpoints.synthetic import (
        LlamaShape,
        make_base,
        make_family,
        save_checkpoint,
        shape_for_parameters,
        write_family_streaming,
    )

    light = work / "light"
    shape = LlamaShape(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2)
    base = make_base(shape, seed=0)
    save_checkpoint(base, light / "base", dtype=torch.bfloat16)
    for i, model in enumerate(make_family(base, n_light, rho=0.5, seed=1)):
        save_checkpoint(model, light / f"m{i}", dtype=torch.bfloat16)
    heavy_shape = shape_for_parameters(int(heavy_params), num_layers=4, vocab_size=8192)
    # base, m0..m3 for the two exact loops (two models each), m4 and m5 for the merges
    dirs = write_family_streaming(work / "heavy", heavy_shape, 6, rho=0.5, dtype=torch.bfloat16, seed=3)
    return {
        "light_base": light / "base",
        "light_models": [light / f"m{i}" for i in range(n_light)],
        "heavy_base": dirs[0],
        "heavy_models": dirs[1:],
        "heavy_params": heavy_shape.num_parameters,
    }


# -- the load ---------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.heavy_codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.heavy_seconds: dict[str, list[float]] = defaultdict(list)
        self.light_calls = 0
        self.job_query_seconds: list[float] = []


def light_requests(pb, data: dict[str, object], seed: int, count: int = 16) -> tuple[list[bytes], list[bytes]]:
    """One client's FINGERPRINT Kinship and ShouldStop requests (random pairs, scores and values), serialised.

    Built once, before any timing: the load generator shares the machine with the server, so
    it should spend its CPU on calls, not on building messages.
    """
    common_pb2, kinship_pb2, recommend_pb2 = pb
    rng = random.Random(seed)
    base = common_pb2.CheckpointRef(path=str(data["light_base"]))
    models = [common_pb2.CheckpointRef(path=str(p)) for p in data["light_models"]]  # type: ignore[union-attr]
    names = [f"m{i}" for i in range(len(models))]
    kinship = [
        kinship_pb2.KinshipRequest(base=base, models=rng.sample(models, 2), mode=common_pb2.KINSHIP_MODE_FINGERPRINT).SerializeToString()
        for _ in range(count)
    ]
    stop = [
        recommend_pb2.ShouldStopRequest(
            members=[recommend_pb2.PopulationMember(name=n, score=rng.uniform(0.3, 0.9), generation=1) for n in names],
            top_k=rng.randint(2, 4),
            known_kinship=[
                recommend_pb2.KnownKinship(pair=recommend_pb2.MemberPair(first=a, second=b), value=rng.uniform(0.5, 1.0))
                for x, a in enumerate(names)
                for b in names[x + 1 :]
            ],
        ).SerializeToString()
        for _ in range(count)
    ]
    return kinship, stop


def raw_methods(channel: grpc.aio.Channel) -> tuple[object, object]:
    """Kinship and ShouldStop callables that send and receive bytes (no (de)serialising in the load generator)."""
    return (
        channel.unary_unary("/kinship.v1.KinshipService/Kinship"),
        channel.unary_unary("/kinship.v1.KinshipService/ShouldStop"),
    )


async def light_client(
    methods: tuple[object, object], requests: tuple[list[bytes], list[bytes]], recorder: Recorder, stop_at: float,
    max_requests: int, seed: int, fingerprint_share: float = 0.5, interval: float = 0.0,
) -> None:
    """One client: calls back to back (`interval` 0, closed loop) or one call every `interval` seconds (open loop).

    Open loop: each call is due at a fixed schedule and its latency counts from when it was
    due, so a server that falls behind is charged for the wait (no coordinated omission).
    """
    rng = random.Random(seed)
    due = time.perf_counter() + (rng.uniform(0, interval) if interval else 0.0)
    kinship_call, stop_call = methods
    kinship_requests, stop_requests = requests
    while time.monotonic() < stop_at and recorder.light_calls < max_requests:
        if interval:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        recorder.light_calls += 1
        if rng.random() < fingerprint_share:
            method = "Kinship[FINGERPRINT]"
            call = kinship_call(rng.choice(kinship_requests), timeout=10)  # type: ignore[operator]
        else:
            method = "ShouldStop"
            call = stop_call(rng.choice(stop_requests), timeout=10)  # type: ignore[operator]
        started = due if interval else time.perf_counter()
        due += interval
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        recorder.latency[method].append(time.perf_counter() - started)
        recorder.codes[method][code] += 1


async def exact_loop(stub, pb, base: Path, models: list[Path], recorder: Recorder, stop_at: float) -> None:
    common_pb2, kinship_pb2, _ = pb
    request = kinship_pb2.KinshipRequest(
        base=common_pb2.CheckpointRef(path=str(base)),
        models=[common_pb2.CheckpointRef(path=str(m)) for m in models],
        mode=common_pb2.KINSHIP_MODE_EXACT,
    )
    touched = next(models[0].glob("*.safetensors"))
    while time.monotonic() < stop_at:
        os.utime(touched)  # a new identity: the pass reads every byte again (no cached pair results)
        started = time.perf_counter()
        try:
            await stub.Kinship(request, timeout=max(1.0, stop_at - time.monotonic() + 60))
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            if code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(0.5)
        recorder.heavy_codes["Kinship[EXACT]"][code] += 1
        if code == "OK":
            recorder.heavy_seconds["Kinship[EXACT]"].append(time.perf_counter() - started)


async def merge_loop(stub, pb, a: Path, b: Path, recorder: Recorder, stop_at: float) -> None:
    common_pb2, _, _ = pb
    from kinship_client.v1 import merge_pb2

    request = merge_pb2.StartMergeRequest(
        model_a=common_pb2.CheckpointRef(path=str(a)),
        model_b=common_pb2.CheckpointRef(path=str(b)),
        t=merge_pb2.InterpolationFactor(entries=[merge_pb2.FilteredFactor(value=merge_pb2.FactorValue(constant=0.5))]),
        output_path="load/merged",
        overwrite=True,
    )
    done = {merge_pb2.MERGE_JOB_STATE_SUCCEEDED, merge_pb2.MERGE_JOB_STATE_FAILED, merge_pb2.MERGE_JOB_STATE_CANCELLED}
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            job = (await stub.StartMerge(request, timeout=30)).job
            state = job.state
            while state not in done:
                await asyncio.sleep(0.2)
                if time.monotonic() >= stop_at:
                    await stub.CancelMergeJob(merge_pb2.CancelMergeJobRequest(job_id=job.job_id), timeout=60)
                    recorder.heavy_codes["StartMerge"]["CANCELLED_AT_END"] += 1
                    return
                asked = time.perf_counter()
                job = (await stub.GetMergeJob(merge_pb2.GetMergeJobRequest(job_id=job.job_id), timeout=10)).job
                recorder.job_query_seconds.append(time.perf_counter() - asked)
                state = job.state
            code = merge_pb2.MergeJobState.Name(state).replace("MERGE_JOB_STATE_", "JOB_")
            if state == merge_pb2.MERGE_JOB_STATE_FAILED:
                code += f"({job.error.reason})"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            await asyncio.sleep(0.5)
        recorder.heavy_codes["StartMerge"][code] += 1
        if code == "JOB_SUCCEEDED":
            recorder.heavy_seconds["StartMerge"].append(time.perf_counter() - started)


async def run_load(
    address: str, data: dict[str, object], args: argparse.Namespace, recorder: Recorder, front_pid: int
) -> dict[str, float]:
    from kinship_client.v1 import common_pb2, kinship_pb2, recommend_pb2, service_pb2_grpc

    pb = (common_pb2, kinship_pb2, recommend_pb2)
    channels = [grpc.aio.insecure_channel(address) for _ in range(args.channels)]
    methods = [raw_methods(c) for c in channels]
    requests = [light_requests(pb, data, seed=i) for i in range(args.clients)]
    interval = args.clients / args.rate if args.rate > 0 else 0.0
    gc.collect()
    gc.freeze()  # the generator's own heap (torch, the data) stays out of GC passes during the run
    heavy_stub = service_pb2_grpc.KinshipServiceStub(grpc.aio.insecure_channel(address))
    heavy_models: list[Path] = data["heavy_models"]  # type: ignore[assignment]
    window_start = time.monotonic()
    sweep = [float(r) for r in args.sweep.split(",") if r.strip()] if args.sweep else []
    heavy_stop = window_start + args.warmup + args.duration + len(sweep) * args.sweep_duration
    heavy = []
    kinds = set() if args.no_heavy else {k.strip() for k in args.heavy.split(",")}
    if "exact" in kinds:
        heavy += [
            asyncio.create_task(exact_loop(heavy_stub, pb, data["heavy_base"], heavy_models[0:2], recorder, heavy_stop)),  # type: ignore[arg-type]
            asyncio.create_task(exact_loop(heavy_stub, pb, data["heavy_base"], heavy_models[2:4], recorder, heavy_stop)),  # type: ignore[arg-type]
        ]
    if "merge" in kinds:
        heavy.append(asyncio.create_task(merge_loop(heavy_stub, pb, heavy_models[4], heavy_models[5], recorder, heavy_stop)))
    # Warm-up, not recorded: the heavy work gets going, the HTTP/2 channels connect and the server
    # loads the light checkpoints' fingerprints, before any light latency counts.
    warm = Recorder()
    warm_until = time.monotonic() + args.warmup
    await asyncio.gather(
        *(
            light_client(methods[i % len(methods)], requests[i], warm, warm_until, args.max_requests, seed=500 + i,
                         fingerprint_share=args.mix, interval=interval)
            for i in range(args.clients)
        )
    )
    sweep_rows = []
    for rate in sweep:  # short windows at increasing offered rates, heavy work running throughout
        probe = Recorder()
        started = time.monotonic()
        await asyncio.gather(
            *(
                light_client(methods[i % len(methods)], requests[i], probe, started + args.sweep_duration, args.max_requests,
                             seed=1000 + i, fingerprint_share=args.mix, interval=args.clients / rate)
                for i in range(args.clients)
            )
        )
        took = time.monotonic() - started
        values = [x for v in probe.latency.values() for x in v]
        errors = sum(n for codes in probe.codes.values() for c, n in codes.items() if c != "OK")
        sweep_rows.append({
            "offered_rps": rate, "achieved_rps": round(len(values) / took, 1), "p50_ms": round(percentile(values, 50) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 2), "errors": errors,
        })
        print(f"  sweep: offered {rate:6.0f}/s -> {sweep_rows[-1]['achieved_rps']:7.1f}/s, p50 {sweep_rows[-1]['p50_ms']:8.2f} ms, "
              f"p99 {sweep_rows[-1]['p99_ms']:8.2f} ms, errors {errors}", flush=True)
    light_start = time.monotonic()
    front_cpu_start = cpu_seconds(front_pid)  # the recorded window only: warm-up and sweep calls are not counted
    loop_wait_start = run_queue_wait_seconds(front_pid)
    stop_at = light_start + args.duration
    await asyncio.gather(
        *(
            light_client(methods[i % len(methods)], requests[i], recorder, stop_at, args.max_requests, seed=i,
                         fingerprint_share=args.mix, interval=interval)
            for i in range(args.clients)
        )
    )
    light_seconds = time.monotonic() - light_start
    front_cpu = cpu_seconds(front_pid) - front_cpu_start
    loop_wait = run_queue_wait_seconds(front_pid) - loop_wait_start
    for task in heavy:
        task.cancel()
    await asyncio.gather(*heavy, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return {  # type: ignore[dict-item]
        "light_seconds": light_seconds, "total_seconds": time.monotonic() - window_start, "sweep": sweep_rows,
        "front_cpu_window_s": front_cpu, "front_loop_run_queue_wait_s": loop_wait,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent light clients")
    parser.add_argument("--channels", type=int, default=8, help="HTTP/2 channels the light clients share")
    parser.add_argument("--rate", type=float, default=1100.0,
                        help="offered light load in calls per second, spread over the clients (open loop); 0: closed loop, as fast as answered")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of light load")
    parser.add_argument("--sweep", default="", help="comma-separated offered rates to probe first (e.g. 200,400,600), heavy work running")
    parser.add_argument("--sweep-duration", type=float, default=6.0, help="seconds per sweep rate")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unrecorded light load (at the offered rate) while the heavy work starts, before the window")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many light calls")
    parser.add_argument("--mix", type=float, default=0.5, help="share of FINGERPRINT Kinship among light calls (rest: ShouldStop)")
    parser.add_argument("--light-models", type=int, default=16, help="registered checkpoints for FINGERPRINT queries")
    parser.add_argument("--heavy-params", type=float, default=4.0e7, help="parameters per model of the heavy (exact, merge) set")
    parser.add_argument("--no-heavy", action="store_true", help="light load only (for comparison)")
    parser.add_argument("--heavy", default="exact,merge", help="which heavy loops run: exact (two EXACT loops), merge (one merge loop)")
    parser.add_argument("--loadgen-nice", type=int, default=0,
                        help="nice value added to this load generator after the server starts (the server keeps its own): "
                             "models clients on other machines, which never take the server's cores")
    parser.add_argument("--server-env", action="append", default=[], help="extra KINSHIP_X=value for the server")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from kinship_client import KinshipClient

    work = args.dir or Path(tempfile.mkdtemp(prefix="kinship-load-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else str(os.getloadavg())
    print(f"processor: {processor_name()}, {os.cpu_count()} cores; work directory {work}", flush=True)
    print(f"load average before (/proc/loadavg): {load_before}", flush=True)
    started = time.perf_counter()
    data = make_data(work, args.light_models, args.heavy_params)
    print(f"generated {args.light_models} light checkpoints and 7 heavy ones ({data['heavy_params'] / 1e6:.0f}M parameters, bf16) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    env = {
        "KINSHIP_HOST": "127.0.0.1",
        "KINSHIP_PORT": "0",
        "KINSHIP_METRICS_PORT": str(free_port()),
        "KINSHIP_ALLOWED_ROOTS": str(work),
        "KINSHIP_CACHE_DIR": str(work / "cache"),
        "KINSHIP_OUTPUT_ROOT": str(work / "merges"),
        "KINSHIP_DEVICE": "cpu",
        "KINSHIP_LOG_LEVEL": "WARNING",
        "KINSHIP_GRACE_SECONDS": "0",
    }
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    process, address = start_server(env, work / "server.log")
    print(f"server pid {process.pid} listening on {address}", flush=True)
    try:
        with KinshipClient(address, timeout=300) as client:
            for model in data["light_models"]:  # type: ignore[union-attr]
                client.register_checkpoint(str(model), str(data["light_base"]))
            client.kinship(str(data["light_base"]), [str(m) for m in data["light_models"][:2]], mode="fingerprint")  # type: ignore[index]
        pids = server_pids(process.pid)  # [front, heavy-work process] (or just the one process)
        if args.loadgen_nice:
            os.nice(args.loadgen_nice)  # this thread, and the threads the load starts from it (Linux: per thread)
        baseline_rss = sum(proc_status(p, "VmRSS") for p in pids)
        recorder = Recorder()
        cpu0, own_cpu0 = [cpu_seconds(p) for p in pids], time.process_time()
        timing = asyncio.run(run_load(address, data, args, recorder, pids[0]))
        process_cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=False)]
        server_cpu = sum(process_cpu)
        own_cpu = time.process_time() - own_cpu0
        process_peaks = [proc_status(p, "VmHWM") for p in pids]
        metrics_port = int(env["KINSHIP_METRICS_PORT"])
        idle_class = metric_value(metrics_port, "kinship_heavy_idle_class")
        boosts = metric_value(metrics_port, "kinship_heavy_priority_boosts_total")
        peak_rss = sum(process_peaks)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    light_total = sum(len(v) for v in recorder.latency.values())
    throughput = light_total / timing["light_seconds"]
    all_light = [x for v in recorder.latency.values() for x in v]
    light_errors = {m: {c: n for c, n in codes.items() if c != "OK"} for m, codes in recorder.codes.items()}
    heavy_bad = {
        m: {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED", "JOB_SUCCEEDED", "CANCELLED_AT_END")}
        for m, codes in recorder.heavy_codes.items()
    }
    p99_all = percentile(all_light, 99) * 1000
    front_cpu = timing["front_cpu_window_s"]
    per_front_cpu_second = light_total / front_cpu if front_cpu > 0 else float("nan")
    load_after = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else str(os.getloadavg())
    results = {
        "clients": args.clients,
        "offered_rate": args.rate,
        "channels": args.channels,
        "duration_s": round(timing["light_seconds"], 2),
        "light_requests": light_total,
        "light_throughput_rps": round(throughput, 1),
        "light_p50_ms": round(percentile(all_light, 50) * 1000, 2),
        "light_p99_ms": round(p99_all, 2),
        "per_rpc": {
            m: {
                "count": len(v),
                "rps": round(len(v) / timing["light_seconds"], 1),
                "p50_ms": round(percentile(v, 50) * 1000, 2),
                "p99_ms": round(percentile(v, 99) * 1000, 2),
                "max_ms": round(max(v) * 1000, 2),
                "codes": dict(recorder.codes[m]),
            }
            for m, v in sorted(recorder.latency.items())
        },
        "heavy": {
            m: {
                "codes": dict(codes),
                "completed": len(recorder.heavy_seconds[m]),
                "mean_s": round(sum(recorder.heavy_seconds[m]) / len(recorder.heavy_seconds[m]), 2) if recorder.heavy_seconds[m] else None,
            }
            for m, codes in sorted(recorder.heavy_codes.items())
        },
        "job_queries": {
            "count": len(recorder.job_query_seconds),
            "p50_ms": round(percentile(recorder.job_query_seconds, 50) * 1000, 2),
            "p99_ms": round(percentile(recorder.job_query_seconds, 99) * 1000, 2),
        },
        "sweep": timing["sweep"],
        "heavy_params_per_model": data["heavy_params"],
        "server_cpu_s": round(server_cpu, 1),
        "server_cpu_s_by_process": [round(c, 1) for c in process_cpu],
        "server_peak_rss_mib_by_process": [round(r, 1) for r in process_peaks],
        "loadgen_cpu_s": round(own_cpu, 1),
        "loadgen_nice": args.loadgen_nice,
        "server_rss_before_load_mib": round(baseline_rss, 1),
        "server_peak_rss_mib": round(peak_rss, 1),
        "front_cpu_s_in_window": round(front_cpu, 2),
        "front_loop_run_queue_wait_s": round(timing["front_loop_run_queue_wait_s"], 3),
        "heavy_scheduling": None if idle_class is None else ("idle" if idle_class else "nice"),
        "heavy_priority_boosts": boosts,
        "light_calls_per_front_cpu_s": round(per_front_cpu_second, 1),
        "front_cpu_us_per_light_call": round(1e6 / per_front_cpu_second, 1) if front_cpu > 0 else None,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "processor": processor_name(),
        "cpus": os.cpu_count(),
    }
    meets = throughput >= 1000 and p99_all < 50 and not any(light_errors.values()) and not any(heavy_bad.values())
    results["meets_targets"] = meets

    print()
    offered = f"offered {args.rate:.0f} calls/s (open loop)" if args.rate > 0 else "closed loop (as fast as answered)"
    print(f"light load: {args.clients} clients over {args.channels} channels, {offered}, for {timing['light_seconds']:.1f} s"
          + ("" if args.no_heavy else ", with 2 EXACT Kinship loops and 1 merge loop in the background"))
    print(f"  {'rpc':24} {'count':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  codes")
    for m, row in results["per_rpc"].items():  # type: ignore[union-attr]
        print(f"  {m:24} {row['count']:8d} {row['rps']:8.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f}  {row['codes']}")
    print(f"  {'all light':24} {light_total:8d} {throughput:8.1f} {results['light_p50_ms']:8.2f} {results['light_p99_ms']:8.2f}")
    jobs = recorder.job_query_seconds
    if jobs:
        print(f"  {'GetMergeJob (merge loop)':24} {len(jobs):8d} {'':8} {percentile(jobs, 50) * 1000:8.2f} "
              f"{percentile(jobs, 99) * 1000:8.2f} {max(jobs) * 1000:8.2f}  (job queries, forwarded; not in 'all light')")
    print("heavy work during the window:")
    for m, row in results["heavy"].items():  # type: ignore[union-attr]
        print(f"  {m:24} completed {row['completed']}, mean {row['mean_s']} s, outcomes {row['codes']}")
    split = f" (front {process_cpu[0]:.1f} s, heavy-work process {sum(process_cpu[1:]):.1f} s)" if len(pids) > 1 else ""
    print(f"CPU used during the run: server {server_cpu:.1f} s{split}, load generator {own_cpu:.1f} s "
          f"(wall {timing['total_seconds']:.1f} s, {os.cpu_count()} cores)")
    peaks = f" (front {process_peaks[0]:.0f} MiB + heavy-work process {sum(process_peaks[1:]):.0f} MiB)" if len(pids) > 1 else ""
    print(f"server RSS: {baseline_rss:.0f} MiB before the load, peak (VmHWM) {peak_rss:.0f} MiB{peaks}")
    who = "front" if len(pids) > 1 else "server (one process, heavy work included)"
    print(f"{who} CPU in the recorded window: {front_cpu:.2f} s for {light_total} light calls: "
          f"{per_front_cpu_second:.0f} light calls per CPU-second ({1e6 / per_front_cpu_second:.0f} us each"
          + (", forwarding the heavy loops' calls included)" if not args.no_heavy else ")"))
    print(f"front event loop waited {results['front_loop_run_queue_wait_s']} s runnable for a CPU in the window (schedstat); "
          f"heavy threads: {results['heavy_scheduling'] or 'one process'}"
          + (f", starvation-guard boosts {boosts:.0f}" if results["heavy_scheduling"] == "idle" and boosts is not None else ""))
    print(f"processor: {processor_name()}, {os.cpu_count()} cores; load average before: {load_before}; after: {load_after}")
    print(f"targets (>= 1000 req/s light, p99 < 50 ms, no errors but RESOURCE_EXHAUSTED on heavy): {'MET' if meets else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
