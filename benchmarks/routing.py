"""Routing benchmark: one replayable stream of mixed prompts (English and Chinese, easy and hard)
served through a pool entry on a real tritonserver by several policies in turn, on the same arrivals:

- always-strongest and always-fastest: every request pinned to that member;
- the learned router: unpinned, each answer rated by the oracle and the reward sent as feedback;
- random split: each request pinned to the strongest with probability p, else the fastest; run at
  the router's own share of the strongest and at the share a straight line between the pinned
  runs' latencies gives for the router's latency. Its reward at the router's mean latency is read
  off the measured curve of splits (the pinned runs are the splits at 1 and 0), since latency is
  not linear in p.

The oracle is the strongest member's judgment, teacher-forced: an answer's reward is the share of
its tokens (and its stop, where it stopped) that the strongest member's weights, given the same
chat prompt and the answer's own prefix, rank first. No member controls it, it needs no reference
answer, and a member whose answer drifts early is not punished for every token after the drift.
The strongest member itself scores about 1.

    fastserve bench --routing --repository R --model pool --strongest fp32 --fastest q4 \\
        --quality-weight 0.99 --rate 1.5 --num-requests 512 --output-len 48 --out bench-results/routing.json

Writes the JSON (every request: prompt id, member, latency, reward), a PNG (the router's regret
against always-strongest over time beside the random split's, and reward over time) and the
server's log beside them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import device_info, percentiles

PROMPTS = Path(__file__).parent / "data" / "routing_prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: int
    lang: str  # en, zh
    level: str  # easy, hard
    kind: str  # fact, word, math, explain, code, compare, write, advice
    prompt: str


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    prompt: Prompt


@dataclass
class Served:
    """One answer as the client saw it."""

    prompt_id: int
    member: str
    text: str
    finish_reason: str | None
    tokens: int
    latency_s: float
    ttft_s: float | None
    at: float = 0.0
    reward: float | None = None
    error: str | None = None
    feedback_error: str | None = None  # the router's run: the pool refused this answer's feedback


def load_prompts(path: Path = PROMPTS) -> list[Prompt]:
    with open(path, encoding="utf-8") as f:
        return [Prompt(**json.loads(line)) for line in f if line.strip()]


def make_stream(prompts: list[Prompt], num: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` per second; the prompts in file order, repeated past the end."""
    rng = random.Random(seed)
    at, stream = 0.0, []
    for i in range(num):
        stream.append(Arrival(at, prompts[i % len(prompts)]))
        at += rng.expovariate(rate)
    return stream


def pool_members(repository: Path, pool: str) -> list[str]:
    settings = json.loads((repository / pool / "pool.json").read_text())
    if settings.get("cache_size", 256):
        raise SystemExit(
            f"pool {pool}: build it with --cache-size 0 for this benchmark; answers from the response cache "
            "would stand in for the latency of the policies that follow the first"
        )
    return [m if isinstance(m, str) else m["name"] for m in settings["members"]]


def ask(
    client, prompt: Prompt, max_tokens: int, member: str | None, at: float = 0.0, quality_weight: float | None = None
) -> tuple[Served, str | None]:
    """Send one chat request, streamed; the answer and the pool's request id for feedback."""
    kw: dict = {"temperature": 0.0, "exclude_input_in_output": True}
    if member is not None:
        kw["model"] = member
    elif quality_weight is not None:
        kw["quality_weight"] = quality_weight
    messages = json.dumps([{"role": "user", "content": prompt.prompt}])
    sent = time.perf_counter()
    first, parts, last = None, [], {}
    try:
        for r in client.responses(messages, max_tokens, None, True, True, kw):
            if first is None and r.get("text_output"):
                first = time.perf_counter() - sent
            parts.append(r.get("text_output", ""))
            last.update({k: v for k, v in r.items() if v is not None})
    except Exception as e:  # recorded: a policy's failures count against it
        return Served(prompt.id, member or "", "", None, 0, time.perf_counter() - sent, first, at, error=str(e)), None
    served = Served(
        prompt.id,
        str(last.get("served_by", member or "")),
        "".join(parts),
        last.get("finish_reason"),
        int(last.get("num_output_tokens") or 0),
        time.perf_counter() - sent,
        first,
        at,
    )
    return served, last.get("request_id")


class Grader:
    """The oracle: the strongest member's weights, offline, rating answers teacher-forced."""

    def __init__(self, engine_folder: Path):
        from python_backend.engine.engine import Engine

        self.engine = Engine.from_folder(engine_folder, num_kv_blocks=64, enable_prefix_caching=False)
        self.tokenizer = self.engine.tokenizer
        self._memo: dict[tuple[int, str, bool], float] = {}

    def reward(self, prompt: Prompt, text: str, stopped: bool) -> float:
        key = (prompt.id, text, stopped)
        if key not in self._memo:
            self._memo[key] = self._rate(prompt, text, stopped)
        return self._memo[key]

    def _rate(self, prompt: Prompt, text: str, stopped: bool) -> float:
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.prompt}], tokenize=False, add_generation_prompt=True
        )
        prefix = self.tokenizer(chat, add_special_tokens=False).input_ids
        answer = self.tokenizer(text, add_special_tokens=False).input_ids
        if stopped and self.tokenizer.eos_token_id is not None:
            answer = answer + [self.tokenizer.eos_token_id]
        if not answer:
            return 0.0
        logits = self.engine.prompt_logits(prefix + answer[:-1])
        choice = logits[len(prefix) - 1 :].argmax(-1).tolist()
        return sum(int(a == b) for a, b in zip(choice, answer)) / len(answer)


def answer_table(
    url: str, pool: str, members: list[str], prompts: list[Prompt], max_tokens: int, concurrency: int
) -> dict[str, dict[int, Served]]:
    """Every member's answer to every prompt, pinned, `concurrency` at a time: the rewards the
    router's feedback will carry, known before any routing."""
    from concurrent.futures import ThreadPoolExecutor

    from clients.client import Client

    client = Client(url, "grpc", pool)
    table: dict[str, dict[int, Served]] = {}
    for member in members:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as workers:
            answers = list(workers.map(lambda p, m=member: ask(client, p, max_tokens, m)[0], prompts))
        failed = [s for s in answers if s.error]
        if failed:
            raise SystemExit(f"{member}: {len(failed)} answers failed, e.g. {failed[0].error}")
        print(f"  {member}: {len(answers)} answers in {time.perf_counter() - start:.0f} s", flush=True)
        table[member] = {p.id: s for p, s in zip(prompts, answers)}
    return table


def replay(
    url: str,
    pool: str,
    stream: list[Arrival],
    max_tokens: int,
    choose: Callable[[Arrival], str | None],
    rate_answer: Callable[[Prompt, Served], float] | None = None,
    quality_weight: float | None = None,
) -> list[Served]:
    """The stream through the pool, each request on its own thread at its arrival time; with
    `rate_answer`, each answer's reward goes back to the pool as feedback."""
    from clients.client import Client

    client = Client(url, "grpc", pool)
    records: list[Served] = []
    lock = threading.Lock()

    def one(arrival: Arrival, member: str | None) -> None:
        served, request_id = ask(client, arrival.prompt, max_tokens, member, arrival.at, quality_weight)
        with lock:
            records.append(served)
        if rate_answer is not None and request_id and not served.error:
            try:
                client.feedback(request_id, rate_answer(arrival.prompt, served))
            except Exception as e:  # counted: feedback lost is learning lost
                served.feedback_error = str(e)

    threads = []
    start = time.perf_counter()
    for arrival in stream:
        delay = start + arrival.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(arrival, choose(arrival)), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return sorted(records, key=lambda s: s.at)


def summarize(records: list[Served]) -> dict:
    ok = [r for r in records if not r.error]
    if not ok:
        return {"requests": len(records), "failed": len(records), "mean_reward": 0.0}
    latency = [r.latency_s for r in ok]
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "feedback_refused": sum(1 for r in records if r.feedback_error),
        "mean_reward": statistics.fmean(r.reward or 0.0 for r in records),
        "latency_s": {"mean": statistics.fmean(latency), **percentiles(latency)},
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "mean_output_tokens": statistics.fmean(r.tokens for r in ok),
        "share": {m: n / len(records) for m, n in sorted(Counter(r.member for r in records).items())},
    }


def by_kind(records: list[Served], prompts: dict[int, Prompt]) -> dict:
    groups: dict[str, list[Served]] = {}
    for r in records:
        p = prompts[r.prompt_id]
        groups.setdefault(f"{p.lang}-{p.level}", []).append(r)
    return {
        k: {
            "mean_reward": statistics.fmean(r.reward or 0.0 for r in rs),
            "share": {m: n / len(rs) for m, n in sorted(Counter(r.member for r in rs).items())},
        }
        for k, rs in sorted(groups.items())
    }


def plot(result: dict, path: Path) -> None:
    """Left: cumulative reward given up against always-strongest on the same requests (the router
    and the random split at its latency). Right: reward over time, a moving mean of 50 requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["policies"]
    strongest = {r["prompt_id"]: r["reward"] for r in runs["strongest"]["records"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in ["router"] + [n for n in runs if n.startswith("random")]:
        total, ys = 0.0, []
        for r in runs[name]["records"]:
            total += strongest[r["prompt_id"]] - r["reward"]
            ys.append(total)
        left.plot(range(1, len(ys) + 1), ys, label=f"{name} (mean latency {runs[name]['latency_s']['mean']:.2f} s)")
    left.set_xlabel("request")
    left.set_ylabel("cumulative regret (reward below always-strongest)")
    left.grid(True, alpha=0.3)
    left.legend()
    for name, run in runs.items():
        rewards = [r["reward"] for r in run["records"]]
        window = 50
        ys = [statistics.fmean(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]
        right.plot(range(1, len(ys) + 1), ys, label=f"{name} ({run['mean_reward']:.3f})")
    right.set_xlabel("request")
    right.set_ylabel("reward, moving mean of 50")
    right.grid(True, alpha=0.3)
    right.legend()
    w = result["workload"]
    fig.suptitle(
        f"pool {w['pool']} ({', '.join(w['members'])}) on {result['device'].get('cpu', '')}: "
        f"{w['num_requests']} requests, Poisson at {w['rate_per_s']:.3g}/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing(args: argparse.Namespace) -> dict:
    import matplotlib  # noqa: F401  (the plot comes last: fail now, not after the runs)

    from python_backend.serve import TritonServer, free_port

    if not args.repository:
        raise SystemExit("fastserve bench --routing: give --repository (the pool's and its members')")
    if args.rate <= 0:
        raise SystemExit("fastserve bench --routing: give --rate, requests per second")
    repository = Path(args.repository)
    pool = args.model
    members = pool_members(repository, pool)
    prompts = load_prompts(Path(args.prompts) if args.prompts else PROMPTS)
    by_id = {p.id: p for p in prompts}
    stream = make_stream(prompts, args.num_requests, args.rate, args.seed)
    used = [by_id[i] for i in sorted({a.prompt.id for a in stream})]
    result: dict = {
        "benchmark": "routing",
        "command": " ".join(sys.argv),
        "device": device_info("cpu"),
        "workload": {
            "pool": pool,
            "members": members,
            "num_requests": len(stream),
            "rate_per_s": args.rate,
            "max_tokens": args.output_len,
            "seed": args.seed,
            "prompts": Counter(f"{p.prompt.lang}-{p.prompt.level}" for p in stream),
        },
        "policies": {},
    }
    state = repository / pool / "router_state.json"
    if state.exists():
        state.unlink()  # the router starts from its priors
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start(timeout=900)
    try:
        url = server.grpc_url
        strongest = args.strongest or members[0]
        fastest = args.fastest or members[-1]
        if {strongest, fastest} - set(members):
            raise SystemExit(f"--strongest and --fastest must be members of {pool}: {', '.join(members)}")
        result["workload"].update(strongest=strongest, fastest=fastest)
        table: dict[str, dict[int, Served]] = {}
        grader: Grader | None = None

        def run(name: str, choose: Callable[[Arrival], str | None], feedback: bool = False) -> list[Served]:
            print(f"{name}: {len(stream)} requests at {args.rate:g}/s ...", flush=True)
            rate_answer, qw = (table_reward, args.quality_weight) if feedback else (None, None)
            records = replay(url, pool, stream, args.output_len, choose, rate_answer, qw)
            result["policies"][name] = {"records": records}
            return records

        def table_reward(prompt: Prompt, served: Served) -> float:
            return table[served.member][prompt.id].reward

        # the pinned runs are also the table's answers for their members
        for name, member in (("strongest", strongest), ("fastest", fastest)):
            records = run(name, lambda a, m=member: m)
            failed = [r for r in records if r.error]
            if failed:
                raise SystemExit(f"{name}: {len(failed)} requests failed, e.g. {failed[0].error}")
            table[member] = {}
            for r in records:
                table[member].setdefault(r.prompt_id, r)
        others = [m for m in members if m not in table]
        if others:
            print(f"answers: {len(used)} prompts x {', '.join(others)}, pinned ...", flush=True)
            table.update(answer_table(url, pool, others, used, args.output_len, args.concurrency))
        print("grading them with the strongest member's weights ...", flush=True)
        grader = Grader(repository / strongest / "1" / "engine")
        for answers in table.values():
            for pid, s in answers.items():
                s.reward = grader.reward(by_id[pid], s.text, s.finish_reason == "stop")
        result["table"] = {
            m: {
                "mean_reward": statistics.fmean(s.reward for s in answers.values()),
                "mean_latency_s": statistics.fmean(s.latency_s for s in answers.values()),
                "by_kind": by_kind(list(answers.values()), by_id),
            }
            for m, answers in table.items()
        }
        router = run("router", lambda a: None, feedback=True)
        # Random splits between strongest and fastest: at the router's own share of the strongest
        # and at the share a straight line between the pinned runs' latencies gives; the reward at
        # the router's latency is read off the measured curve (pinned runs are the splits at 0 and 1).
        served = [r for r in router if not r.error]
        share = sum(r.member == strongest for r in served) / max(1, len(served))
        lat = {k: _mean_latency(result["policies"][k]["records"]) for k in ("strongest", "fastest", "router")}
        span = lat["strongest"] - lat["fastest"]
        line = min(1.0, max(0.0, (lat["router"] - lat["fastest"]) / span)) if span > 0 else 0.5
        shares = sorted({round(share, 3), round(line, 3)} - {0.0, 1.0})
        result["workload"]["random_shares_strongest"] = shares
        for q in shares:
            rng = random.Random(args.seed + 1)
            run(f"random {q:.3f}", lambda a, q=q, rng=rng: strongest if rng.random() < q else fastest)
    finally:
        Path(args.out).with_suffix(".server.log").write_text(server.log())
        server.stop()
    for name, entry in result["policies"].items():
        records = entry["records"]
        same = 0
        for r in records:
            if r.error:
                r.reward = 0.0
                continue
            r.reward = grader.reward(by_id[r.prompt_id], r.text, r.finish_reason == "stop")
            known = table.get(r.member, {}).get(r.prompt_id)
            same += int(known is not None and r.text == known.text)
        result["policies"][name] = {
            **summarize(records),
            "answers_as_in_table": same / len(records),
            "by_kind": by_kind(records, by_id),
            "records": [asdict(r) for r in records],
        }
    runs = result["policies"]
    result["random_at_router_latency"] = random_at_latency(runs, runs["router"]["latency_s"]["mean"])
    strong = runs["strongest"]
    result["comparison"] = {
        name: {
            "reward_vs_strongest": run["mean_reward"] / strong["mean_reward"],
            "mean_latency_vs_strongest": run["latency_s"]["mean"] / strong["latency_s"]["mean"],
            "p99_latency_vs_strongest": run["latency_s"]["p99"] / strong["latency_s"]["p99"],
        }
        for name, run in runs.items()
    }
    share = runs["router"]["share"].get(strongest, 0.0)
    groups = {p.id: f"{p.lang}-{p.level}-{p.kind}" for p in prompts}
    rewards = {m: {pid: s.reward for pid, s in table[m].items()} for m in (strongest, fastest)}
    result["headroom"] = headroom(rewards[strongest], rewards[fastest], groups, share)
    router = result["comparison"]["router"]
    result["router_meets_target"] = {
        "reward_at_least_95pct_of_strongest": router["reward_vs_strongest"] >= 0.95,
        "mean_latency_at_most_70pct_of_strongest": router["mean_latency_vs_strongest"] <= 0.70,
        "beats_random_split_on_reward": runs["router"]["mean_reward"]
        > result["random_at_router_latency"]["mean_reward"],
    }
    png = Path(args.out).with_suffix(".png")
    plot(result, png)
    result["plot"] = str(png)
    return result


def headroom(strong: dict[int, float], fast: dict[int, float], groups: dict[int, str], share: float) -> dict:
    """What routing between two members can win over a random split that sends the same `share` to
    the strongest: the best a policy that knows each group's mean gain exactly can reach (groups
    being what a router can see of a prompt), and the best with hindsight of every answer. Beside
    them, the standard error of a mean reward over these prompts, the noise any measured policy's
    reward carries."""
    ids = sorted(strong.keys() & fast.keys())
    gains = {i: strong[i] - fast[i] for i in ids}
    base = statistics.fmean(fast[i] for i in ids)
    take = round(share * len(ids))
    members: dict[str, list[int]] = {}
    for i in ids:
        members.setdefault(groups[i], []).append(i)
    ranked = sorted(members.values(), key=lambda g: -statistics.fmean(gains[i] for i in g))
    left, by_group = take, 0.0
    for group in ranked:
        n = min(left, len(group))
        by_group += n * statistics.fmean(gains[i] for i in group)
        left -= n
    random_split = base + share * statistics.fmean(gains.values())
    return {
        "share_strongest": share,
        "random_split": random_split,
        "best_by_group": base + by_group / len(ids),
        "best_in_hindsight": base + sum(sorted(gains.values(), reverse=True)[:take]) / len(ids),
        "reward_standard_error": statistics.pstdev(fast[i] for i in ids) / len(ids) ** 0.5,
    }


def _mean_latency(records: list[Served]) -> float:
    return statistics.fmean([r.latency_s for r in records if not r.error] or [0.0])


def random_at_latency(runs: dict, latency_s: float) -> dict:
    """A random split's reward at `latency_s`, linear between the nearest measured splits (the
    pinned strongest and fastest runs are the splits at 1 and 0). Beyond the measured range, the
    nearest end."""
    points = sorted(
        (run["latency_s"]["mean"], run["mean_reward"], name)
        for name, run in runs.items()
        if name in ("strongest", "fastest") or name.startswith("random")
    )
    below = [p for p in points if p[0] <= latency_s]
    above = [p for p in points if p[0] > latency_s]
    if not below or not above:
        lat, reward, name = (below or above)[-1] if below else above[0]
        return {"mean_reward": reward, "from": [name], "latency_s": lat}
    (l0, r0, n0), (l1, r1, n1) = below[-1], above[0]
    t = (latency_s - l0) / (l1 - l0)
    return {"mean_reward": r0 + t * (r1 - r0), "from": [n0, n1], "latency_s": latency_s}


def print_routing(result: dict) -> None:
    print(f"\n{'policy':<10}{'reward':>8}{'vs strong':>10}{'mean s':>8}{'p99 s':>8}{'vs strong':>10}  share")
    for name, run in result["policies"].items():
        c = result["comparison"][name]
        share = ", ".join(f"{m} {v:.0%}" for m, v in run["share"].items())
        print(
            f"{name:<10}{run['mean_reward']:>8.3f}{c['reward_vs_strongest']:>10.2f}{run['latency_s']['mean']:>8.2f}"
            f"{run['latency_s']['p99']:>8.2f}{c['mean_latency_vs_strongest']:>10.2f}  {share}"
        )
    at = result["random_at_router_latency"]
    print(f"random split at the router's latency: reward {at['mean_reward']:.3f} (from {', '.join(at['from'])})")
    h = result["headroom"]
    print(
        f"at the router's share of the strongest ({h['share_strongest']:.0%}): random {h['random_split']:.4f}, "
        f"best by prompt group {h['best_by_group']:.4f}, in hindsight {h['best_in_hindsight']:.4f}, "
        f"standard error {h['reward_standard_error']:.4f}"
    )
    for k, v in result["router_meets_target"].items():
        print(f"{k}: {v}")
