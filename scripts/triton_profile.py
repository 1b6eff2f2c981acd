"""Where the server's time goes under load: samples the Python-backend stub and the engine process
with py-spy during one closed-loop run, and reads every process's CPU time from /proc around it.

    python scripts/triton_profile.py --repository REPO --model NAME --tokenizer DIR --out DIR \
        [--concurrency 256 --num-prompts 256 --input-len 256 --output-len 128 --runs 3 --py-spy PATH]

Writes DIR/profile.json (runs, CPU seconds per process during the sampled run, the top frames of each
sampled process) and DIR/<process>.folded (py-spy's raw stacks). Diagnostics, not a benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import _scrape, _server_view, load, salted, synthetic_prompts  # noqa: E402
from python_backend.serve import TritonServer, free_port  # noqa: E402


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    name = Path(cmd[0].decode(errors="replace")).name
    if name == "triton_python_backend_stub":
        return "stub"
    if b"multiprocessing.spawn" in b" ".join(cmd) or b"spawn_main" in b" ".join(cmd):
        return "engine"
    return name


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(folded: Path, top: int = 25) -> dict:
    leaf, incl, total = collections.Counter(), collections.Counter(), 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    share = lambda c: [(k, round(v / max(total, 1), 4)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "leaf": share(leaf), "inclusive": share(incl)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs; the middle one is sampled")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = p.parse_args()
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = synthetic_prompts(tok, len(tok), args.num_prompts, args.input_len, args.input_len, 0)
    lengths = [args.output_len] * args.num_prompts
    server = TritonServer(Path(args.repository), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start(timeout=900)
    result: dict = {"runs": []}
    try:
        load(server.grpc_url, args.model, salted(prompts, "warm-up"), lengths, args.concurrency)
        procs = {pid: describe(pid) for pid in [server.proc.pid, *descendants(server.proc.pid)]}
        result["processes"] = {str(k): v for k, v in procs.items()}
        sampled = args.runs // 2
        for i in range(args.runs):
            spies, before_cpu = [], {}
            if i == sampled:
                before_cpu = {pid: cpu_seconds(pid) for pid in procs}
                can_spy = Path(args.py_spy).exists() or shutil.which(args.py_spy)
                for pid, name in procs.items():
                    if can_spy and name in ("stub", "engine"):
                        cmd = [
                            args.py_spy,
                            "record",
                            "-p",
                            str(pid),
                            "-r",
                            "250",
                            "-f",
                            "raw",
                            "-o",
                            str(out / f"{name}-{pid}.folded"),
                            "--nonblocking",
                            "--threads",
                        ]
                        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                time.sleep(2.0)  # py-spy attaches; it samples until it is interrupted after the run
            before = _scrape(server.metrics_url)
            t0 = time.perf_counter()
            run = load(server.grpc_url, args.model, salted(prompts, f"run {i}"), lengths, args.concurrency)
            run["server"] = _server_view(before, _scrape(server.metrics_url))
            run["sampled"] = i == sampled
            if i == sampled:
                wall = time.perf_counter() - t0
                run["cpu_s"] = {f"{procs[pid]}-{pid}": round(cpu_seconds(pid) - before_cpu[pid], 3) for pid in procs}
                run["wall_s"] = round(wall, 3)
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    _, err = spy.communicate(timeout=60)
                    if spy.returncode:
                        run.setdefault("py_spy_errors", []).append(err.decode(errors="replace")[-500:])
            result["runs"].append(run)
            print(
                f"run {i}: {run['output_tokens_per_s']:.0f} tok/s  server {run['server']}"
                + (f"  cpu {run['cpu_s']}" if i == sampled else ""),
                flush=True,
            )
    finally:
        server.stop()
    for folded in sorted(out.glob("*.folded")):
        result[folded.stem] = summarise(folded)
        print(f"== {folded.stem}: {result[folded.stem]['samples']} samples")
        for frame, share in result[folded.stem]["leaf"][:12]:
            print(f"  {share:6.1%}  {frame}")
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
