"""Online load for scheduling policies: requests arrive over time (Poisson or bursty) with a heavy-tailed
mix of output lengths, and every policy serves the same arrival trace, one after the other, on the
same engine settings. Reports job completion time (JCT) and time to first token (TTFT) percentiles,
overall and per class of job, and throughput; writes JSON and a PNG of the JCT distributions.

    fastserve bench --online --repository R --model smollm2 --policies fcfs,mlfq --load 0.85 \
        --mix 0.8:16-64,0.2:512-1024 --num-requests 200 --out online.json

--load is a fraction of the capacity measured first (the same requests all at once, FCFS); --rate
gives requests per second instead. With --url the trace goes to a running server instead (one policy:
the server's own).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import device_info, engine_config, engine_dir, percentiles, save, synthetic_prompts
from python_backend.engine.sequence import SamplingParams


@dataclass
class Job:
    at: float  # seconds after the start of the run
    prompt: str
    max_tokens: int
    kind: str  # the mix class it was drawn from


def parse_mix(text: str) -> list[tuple[float, int, int, str]]:
    """'0.8:16-64,0.2:512-1024' -> [(weight, low, high, 'short'), ...]; named short, long, or class-i."""
    classes = []
    for part in text.split(","):
        weight, _, span = part.partition(":")
        lo, _, hi = span.partition("-")
        try:
            w, low, high = float(weight), int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"--mix {text!r}: each class is weight:low-high, e.g. 0.8:16-64") from None
        if w <= 0 or not 1 <= low <= high:
            raise SystemExit(f"--mix {text!r}: weights must be positive and 1 <= low <= high")
        classes.append((w, low, high))
    classes.sort(key=lambda c: c[2])
    names = ["short", "long"] if len(classes) == 2 else [f"class-{i}" for i in range(len(classes))]
    return [(w, lo, hi, name) for (w, lo, hi), name in zip(classes, names)]


def make_trace(
    prompts: list[str],
    rate: float,
    arrivals: str,
    mix: list[tuple[float, int, int, str]],
    seed: int,
    burst_cv: float = 2.0,
) -> list[Job]:
    """Arrival times and output lengths, fixed by the seed. Poisson: exponential gaps. Bursty: gamma gaps
    with coefficient of variation burst_cv (the same mean rate, arrivals in clumps)."""
    rng = random.Random(seed)
    total = sum(w for w, *_ in mix)
    t, jobs = 0.0, []
    for prompt in prompts:
        if jobs:
            if arrivals == "poisson":
                t += rng.expovariate(rate)
            else:
                shape = 1.0 / burst_cv**2
                t += rng.gammavariate(shape, 1.0 / (rate * shape))
        x, acc = rng.random() * total, 0.0
        for w, lo, hi, name in mix:  # noqa: B007 (the chosen class is read after the loop)
            acc += w
            if x <= acc:
                break
        jobs.append(Job(at=t, prompt=prompt, max_tokens=rng.randint(lo, hi), kind=name))
    return jobs


def summarize(records: list[dict], span: float) -> dict:
    out = {
        "requests": len(records),
        "output_tokens": sum(r["tokens"] for r in records),
        "seconds": span,
        "jct_s": percentiles([r["jct"] for r in records]),
        "ttft_s": percentiles([r["ttft"] for r in records if r["ttft"] is not None]),
        "by_class": {},
    }
    out["output_tokens_per_s"] = out["output_tokens"] / span if span > 0 else 0.0
    for kind in sorted({r["kind"] for r in records}):
        sub = [r for r in records if r["kind"] == kind]
        out["by_class"][kind] = {
            "requests": len(sub),
            "jct_s": percentiles([r["jct"] for r in sub]),
            "ttft_s": percentiles([r["ttft"] for r in sub if r["ttft"] is not None]),
        }
    return out


def saturated_rate(records: list[dict], span: float, min_done: int = 20) -> tuple[float, str]:
    """Requests per second the engine completes while requests still wait: completions in the second
    half of the time before the last request was admitted. All requests over the whole run would
    count the drain at the end, a few long jobs running alone, and understate capacity (so much, on a
    fast GPU, that FCFS at "85%" would barely queue)."""
    t_sat = max(r["admitted_at"] for r in records)
    done = sum(1 for r in records if t_sat / 2 < r["finished_at"] <= t_sat)
    if t_sat > 0 and done >= min_done:
        return done / (t_sat / 2), "completions while requests waited (second half of the admission period)"
    return len(records) / span, "all requests over the whole run (too few completed while requests waited)"


def run_engine_trace(folder: Path, cfg, trace: list[Job]) -> tuple[list[dict], float, dict]:
    """Serve the trace with the engine in this process (its loop on its own thread, as in the server)."""
    from python_backend.engine.engine import Engine

    engine = Engine.launch(folder, cfg)
    try:
        # warm up on a burst of the trace's own prompts: kernels compile and graphs are captured for the
        # batch sizes the run will see, before anything is timed (otherwise the capacity run pays for it)
        warm = [job.prompt for job in trace[:64]]
        engine.generate(warm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        engine.blocks.reset_prefix_cache()
        done = threading.Event()
        remaining = [len(trace)]
        lock = threading.Lock()

        def on_output(out) -> None:
            if out.finished:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        seqs = []
        start = time.perf_counter()
        for i, job in enumerate(trace):
            delay = start + job.at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            seqs.append(
                engine.add_request(
                    f"online-{i}",
                    job.prompt,
                    SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True),
                    on_output,
                )
            )
        done.wait()
        end = max(s.timing.finished for s in seqs)
        records = [
            {
                "kind": job.kind,
                "tokens": len(s.output_ids),
                "jct": s.timing.finished - s.timing.arrival,
                "ttft": s.timing.ttft,
                "admitted_at": (s.timing.first_scheduled or start) - start,
                "finished_at": s.timing.finished - start,
            }
            for job, s in zip(trace, seqs)
        ]
        state = engine.scheduler.state()
        state.pop("quanta_s", None)
        if hasattr(engine.scheduler, "quanta"):
            state["quanta_s"] = engine.scheduler.quanta
            state["profile"] = vars(engine.scheduler.profile)
        return records, end - start, state
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def run_server_trace(url: str, model: str, trace: list[Job]) -> tuple[list[dict], float, dict]:
    """Send the trace to a running server over gRPC streams, one thread per request."""
    from clients.client import Client

    client = Client(url, "grpc", model)
    records: list[dict] = []
    lock = threading.Lock()

    def one(job: Job) -> None:
        sent = time.perf_counter()
        first, n = None, 0
        for r in client.responses(
            job.prompt,
            job.max_tokens,
            None,
            True,
            False,
            {"temperature": 0.0, "ignore_eos": True, "exclude_input_in_output": True},
        ):
            if first is None and r.get("text_output"):
                first = time.perf_counter()
            if r.get("num_output_tokens") is not None:
                n = int(r["num_output_tokens"])
        with lock:
            records.append(
                {
                    "kind": job.kind,
                    "tokens": n,
                    "jct": time.perf_counter() - sent,
                    "ttft": None if first is None else first - sent,
                }
            )

    threads = []
    start = time.perf_counter()
    for job in trace:
        delay = start + job.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(job,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return records, time.perf_counter() - start, {}


def plot(result: dict, path: Path) -> None:
    """JCT distributions per policy: CDFs, all jobs and per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = ["all"] + sorted({k for p in result["policies"].values() for k in p["by_class"]})
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    for ax, kind in zip(axes[0], classes):
        for name, p in result["policies"].items():
            jcts = sorted(r["jct"] for r in p["records"] if kind == "all" or r["kind"] == kind)
            if not jcts:
                continue
            ys = [(i + 1) / len(jcts) for i in range(len(jcts))]
            mean = statistics.fmean(jcts)
            ax.step(jcts, ys, where="post", label=f"{name} (mean {mean:.1f} s)")
        ax.set_xscale("log")
        ax.set_xlabel("job completion time (s)")
        ax.set_ylabel("fraction of jobs")
        ax.set_title(f"{kind} jobs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    w = result["workload"]
    fig.suptitle(
        f"{w['model']} on {result['device'].get('gpu') or result['device'].get('cpu', '')}: "
        f"{w['arrivals']} arrivals at {w['rate_per_s']:.3g} req/s"
        + (f" ({w['load']:.0%} of capacity)" if w.get("load") else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def online(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    mix = parse_mix(args.mix)
    policies = [p for p in args.policies.split(",") if p]
    result: dict = {"benchmark": "online", "command": " ".join(sys.argv), "policies": {}}
    if args.url:
        folder = Path(args.engine_dir) if args.engine_dir else None
        if folder is None:
            raise SystemExit("fastserve bench --online --url: give --engine-dir for the tokenizer")
        cfg = None
    else:
        folder = engine_dir(args)
        cfg = engine_config(args)
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = synthetic_prompts(
        tok, len(tok), args.num_requests, args.input_len, args.input_len_max or args.input_len, args.seed
    )
    result["device"] = device_info(cfg.device if cfg else "cpu")
    rate, load = args.rate, None
    if not rate:
        if args.url:
            raise SystemExit("fastserve bench --online --url: give --rate")
        print(f"capacity: {len(prompts)} requests at once (fcfs) ...", flush=True)
        burst = make_trace(prompts, 1.0, "poisson", mix, args.seed)
        for job in burst:
            job.at = 0.0
        cfg.scheduler = "fcfs"
        records, span, _ = run_engine_trace(folder, cfg, burst)
        capacity, how = saturated_rate(records, span)
        result["capacity"] = {"requests_per_s": capacity, "measured_as": how, **summarize(records, span)}
        load, rate = args.load, args.load * capacity
    trace = make_trace(prompts, rate, args.arrivals, mix, args.seed)
    result["workload"] = {
        "model": args.model,
        "num_requests": len(trace),
        "arrivals": args.arrivals,
        "rate_per_s": rate,
        "load": load,
        "mix": args.mix,
        "input_len": args.input_len,
        "input_len_max": args.input_len_max or args.input_len,
        "seed": args.seed,
        "mean_output_tokens": statistics.fmean(j.max_tokens for j in trace),
        "engine_config": None if cfg is None else {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    for name in policies:
        print(f"{name}: {len(trace)} requests, {args.arrivals} arrivals at {rate:.3f}/s ...", flush=True)
        if args.url:
            records, span, state = run_server_trace(args.url, args.model, trace)
        else:
            cfg.scheduler = name
            records, span, state = run_engine_trace(folder, cfg, trace)
        result["policies"][name] = {**summarize(records, span), "scheduler": state, "records": records}
        save(result, args.out)
    if "fcfs" in result["policies"] and "mlfq" in result["policies"]:
        f, m = result["policies"]["fcfs"], result["policies"]["mlfq"]
        result["comparison"] = {
            "mean_jct_fcfs_over_mlfq": f["jct_s"]["mean"] / m["jct_s"]["mean"],
            "p99_jct_fcfs_over_mlfq": f["jct_s"]["p99"] / m["jct_s"]["p99"],
            "throughput_mlfq_over_fcfs": m["output_tokens_per_s"] / f["output_tokens_per_s"],
        }
    png = Path(args.out).with_suffix(".png")
    plot(result, png)
    result["plot"] = str(png)
    return result


def print_online(result: dict) -> None:
    print(f"\n{'policy':<8}{'mean JCT':>10}{'p50':>8}{'p90':>8}{'p99':>8}{'mean TTFT':>11}{'p99 TTFT':>10}{'tok/s':>9}")
    for name, p in result["policies"].items():
        j, t = p["jct_s"], p["ttft_s"]
        print(
            f"{name:<8}{j['mean']:>10.2f}{j['p50']:>8.2f}{j['p90']:>8.2f}{j['p99']:>8.2f}{t['mean']:>11.3f}"
            f"{t['p99']:>10.3f}{p['output_tokens_per_s']:>9.1f}"
        )
    for k, v in result.get("comparison", {}).items():
        print(f"{k}: {v:.2f}")
