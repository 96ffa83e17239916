"""The figures of each benchmark's JSON that go in docs/results.md, each beside what it is measured
against: the floor (the same work without us, in the same run), a peer's documented figure, or
the target the issues set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    figure: str
    ours: float
    unit: str
    against: float | None = None
    against_is: str = "—"
    """What ``against`` is: "floor: …" (measured in the same run), "anchor: …" (a peer's
    documented figure) or "target" (what the issues asked for)."""
    target: str = "—"
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if not self.against:
            return None
        return self.ours / self.against


def bus_roundtrip(r: dict[str, Any]) -> list[Row]:
    floor, ours = r["floor"], r["ours"]
    raw = "floor: raw redis-py XADD, XREADGROUP, XACK"
    return [
        Row("command round trip, p50", ours["p50_ms"], "ms", floor["p50_ms"], raw,
            target="≤ 2x floor", met=r["ratio_p50"] <= 2),
        Row("command round trip, p99", ours["p99_ms"], "ms", floor["p99_ms"], raw,
            target="≤ 3x floor", met=r["ratio_p99"] <= 3),
        Row("commands/s in batches of 64", ours["commands_per_s_batched_64"], "/s",
            floor["commands_per_s_batched_64"], raw),
    ]  # fmt: skip


def recovery(r: dict[str, Any]) -> list[Row]:
    exited, relaunch = r["kill9_to_exited_ms"], r["relaunch_minus_backoff_ms"]
    hang, failover = r["hang_to_restart_decision_s"], r["scheduler_failover_s"]
    away = r["agent_away"]
    return [
        Row("kill -9 → engine.exited, p50", exited["p50"], "ms", 200, "target",
            target="≤ 200 ms", met=exited["p50"] <= 200),
        Row("relaunch minus its backoff delay, p99", relaunch["p99"], "ms", 100, "target",
            target="± 100 ms", met=abs(relaunch["p99"]) <= 100),
        Row("hang (SIGSTOP) → restart decision, p99", hang["p99"], "s", 20,
            "anchor: original control plane, 10 s probes x 2 failures",
            target="≤ 6 s", met=hang["p99"] <= 6),
        Row("hang (SIGSTOP) → new process, p99", r["hang_to_new_process_s"]["p99"], "s", 8,
            "target", target="≤ 8 s", met=r["hang_to_new_process_s"]["p99"] <= 8),
        Row("agent away 3x its TTL: engines untouched", away["untouched"], "",
            away["engines"], "target: all of them", target="all",
            met=away["untouched"] == away["engines"]),
        Row("leader kill -9 → a standby leads, p99", failover["p99"], "s", 6, "target",
            target="≤ lease 5 s + 1 s", met=failover["p99"] <= 6),
    ]  # fmt: skip


def scale(r: dict[str, Any]) -> list[Row]:
    placement, lag = r["placement_latency_ms"], r["event_lag_s"]
    cpu = r["scheduler_cpu_share_of_a_core"]
    per_node = r["redis_bytes_per_node"]["with_engines_and_streams"] / 1024
    fleet = f"{r['nodes']} nodes x {r['gpus_per_node']} GPUs, {r['placed']} placed"
    return [
        Row(f"placement latency, p99 ({fleet})", placement["p99"], "ms", 10, "target",
            target="p99 ≤ 10 ms", met=placement["p99"] <= 10),
        Row("event lag while placing, p99", lag["placing"]["p99"], "s", 1, "target",
            target="< 1 s", met=lag["placing"]["p99"] < 1),
        Row("scheduler CPU in the steady state", cpu["steady"], "of a core", 0.5, "target",
            target="≤ 0.5 of a core", met=cpu["steady"] <= 0.5),
        Row("Redis memory per node", round(per_node, 1), "KiB"),
    ]  # fmt: skip


def gateway_overhead(r: dict[str, Any]) -> list[Row]:
    load, single, client = r["under_load"], r["one_at_a_time"], r["client_redis_mode"]
    return [
        Row(f"throughput through the gateway, {r['concurrency']} clients",
            load["gateway"]["rps"], "req/s", load["direct"]["rps"],
            "floor: the same requests straight to the engine",
            target="≥ 0.8x floor", met=load["throughput_ratio"] >= 0.8),
        Row("latency the gateway adds, p50", single["added_p50_ms"], "ms", 2.0,
            "anchor: LiteLLM proxy, 2-12 ms p50 (its docs)",
            target="≤ 1 ms", met=single["added_p50_ms"] <= 1),
        Row("latency the gateway adds, p99", single["added_p99_ms"], "ms", 5.0, "target",
            target="≤ 5 ms", met=single["added_p99_ms"] <= 5),
        Row("client in Redis mode, p50", client["client"]["p50"], "ms", client["direct"]["p50"],
            "floor: httpx straight to the engine",
            target="≤ 1.05x floor", met=client["overhead_pct_p50"] <= 5),
    ]  # fmt: skip


def batch_throughput(r: dict[str, Any]) -> list[Row]:
    direct, queued = r["direct"], r["queued"]
    return [
        Row(f"batch throughput, {r['requests']} requests, 2 workers", queued["rps"], "req/s",
            direct["rps"], f"floor: an async client, {r['concurrency']} in flight",
            target="≥ 0.5x floor", met=r["throughput_ratio"] >= 0.5),
        Row("time to the first batch result", queued["first_s"], "s", direct["first_s"],
            "floor: the first direct answer"),
    ]  # fmt: skip


def real_engine(r: dict[str, Any]) -> list[Row]:
    start, load, single, batch = r["cold_start"], r["under_load"], r["one_at_a_time"], r["batch"]
    by_hand = "floor: the same argv and env started by hand, to 200 on its health path"
    rows = [
        Row(
            f"{name} cold start to RUNNING (Gemma-3-270M, CPU), median",
            c["ours_median_s"],
            "s",
            c["floor_median_s"],
            by_hand,
            target="≤ floor + 2 s",
            met=None
            if c["floor_median_s"] is None
            else c["ours_median_s"] <= c["floor_median_s"] + 2,
        )
        for name, c in (("vLLM", start["vllm"]), ("llama.cpp", start["llamacpp"]))
    ]
    return [
        *rows,
        Row(f"vLLM through the gateway, {r['concurrency']} clients, {r['max_tokens']} tokens",
            load["gateway"]["rps"], "req/s", load["direct"]["rps"],
            "floor: the same requests straight to vLLM", target="≥ 0.95x floor",
            met=load["throughput_ratio"] >= 0.95),
        Row(f"latency the gateway adds to a vLLM answer, p50 of {single['gateway']['n']}",
            single["added_p50_ms"], "ms", single["direct"]["p50"],
            "floor: the answer's own latency, straight to vLLM",
            target="≤ 2 % of the answer",
            met=single["added_p50_ms"] <= 0.02 * single["direct"]["p50"]),
        Row(f"batch on vLLM, {r['requests']} requests, 2 workers", batch["queued"]["rps"],
            "req/s", batch["direct"]["rps"],
            f"floor: an async client, {r['concurrency']} in flight straight to vLLM",
            target="≥ 0.8x floor", met=batch["throughput_ratio"] >= 0.8),
    ]  # fmt: skip


def upstream_client(r: dict[str, Any]) -> list[Row]:
    sides = r["sides"]
    ours = sides["ours"]["cpu_ms_per_request"]
    rows = []
    for peer, what in (("aiohttp", "aiohttp's ClientSession"), ("httpx", "httpx's AsyncClient")):
        if peer in sides:
            rows.append(
                Row(
                    f"engine hop: CPU per request vs {peer}",
                    ours,
                    "ms",
                    sides[peer]["cpu_ms_per_request"],
                    f"floor: {what}, same hop",
                    target="≤ 1x (else use it)",
                    met=ours <= sides[peer]["cpu_ms_per_request"],
                )
            )
    return rows  # fmt: skip


def failover(r: dict[str, Any]) -> list[Row]:
    wait, running = r["bus_wait"], r["kill_to_running_s"]
    plain = "floor: the same writes not waiting for the replica"
    return [
        Row("bus round trip, writes wait for a replica, p50", wait["with_wait"]["p50_ms"], "ms",
            wait["without_wait"]["p50_ms"], plain),
        Row("bus round trip, writes wait for a replica, p99", wait["with_wait"]["p99_ms"], "ms",
            wait["without_wait"]["p99_ms"], plain),
        Row("primary kill -9 → a new start RUNNING, p50", running["p50"], "s"),
        Row("primary kill -9 → a new start RUNNING, p99", running["p99"], "s"),
    ]  # fmt: skip


HEADLINES = {
    "bus_roundtrip": bus_roundtrip,
    "recovery": recovery,
    "scale": scale,
    "gateway_overhead": gateway_overhead,
    "batch_throughput": batch_throughput,
    "real_engine": real_engine,
    "upstream_client": upstream_client,
    "failover": failover,
}
