#!/usr/bin/env python3
"""Turns the criterion results under target/criterion into the tables of BENCHMARKS.md.

Run after `cargo bench --bench fingerprint --bench layer --bench stores`:
    python3 benches/report.py
"""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "target", "criterion")


def mean_ns(*path):
    with open(os.path.join(ROOT, *path, "new", "estimates.json")) as f:
        return json.load(f)["mean"]["point_estimate"]


def have(*path):
    return os.path.exists(os.path.join(ROOT, *path, "new", "estimates.json"))


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def fmt_rate(bytes_per_s):
    gib = bytes_per_s / 2**30
    return f"{gib:.2f} GiB/s" if gib >= 1 else f"{bytes_per_s / 2**20:.0f} MiB/s"


def layer():
    print("### Layer overhead in process (memory store, ~1 KiB JSON answer)\n")
    bare = mean_ns("layer", "bare_handler")
    print("| case | time per request | added to the bare handler | ratio to bare |")
    print("|---|---:|---:|---:|")
    print(f"| bare handler | {fmt_time(bare)} | – | 1.00 |")
    for name, label in [
        ("passthrough_no_key", "passthrough (no key)"),
        ("first_request_fresh_key", "first request, fresh key (claim, run, store)"),
        ("replay", "duplicate (replay)"),
        ("mismatch_422", "mismatch (422)"),
    ]:
        t = mean_ns("layer", name)
        print(f"| {label} | {fmt_time(t)} | +{fmt_time(t - bare)} | {t / bare:.2f} |")
    print()


def fingerprint():
    print("### Fingerprint throughput (16 KiB chunks, as hyper delivers them)\n")
    print("| body | contiguous `xxh3_128` (ceiling) | `Xxh3::update` per chunk, no body | streamed through the hashing body | streamed / ceiling |")
    print("|---:|---:|---:|---:|---:|")
    for size in [64, 1024, 16384, 65536, 1048576, 16777216]:
        ceiling = mean_ns("fingerprint", "contiguous_xxh3_128", str(size))
        streamed = mean_ns("fingerprint", "streamed_16KiB_chunks", str(size))
        raw = mean_ns("fingerprint", "xxh3_update_16KiB_chunks", str(size))
        label = f"{size // 1048576} MiB" if size >= 1048576 else (f"{size // 1024} KiB" if size >= 1024 else f"{size} B")
        print(f"| {label} | {fmt_rate(size / ceiling * 1e9)} | {fmt_rate(size / raw * 1e9)} | {fmt_rate(size / streamed * 1e9)} | {ceiling / streamed:.2f} |")
    print()


def contention():
    if not have("contention", "bare_handler", "1"):
        return
    print("### Contention: requests/s on a multi-threaded runtime (all cores), 200 requests per task\n")
    print("| tasks | bare handler | replays of one key | ratio to bare | claims of distinct keys | ratio to bare |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tasks in [1, 2, 4, 16, 64]:
        per_iter = tasks * 200
        rate = lambda name: per_iter / mean_ns("contention", name, str(tasks)) * 1e9
        bare, replay, claim = rate("bare_handler"), rate("replay_same_key"), rate("claim_distinct_keys")
        print(f"| {tasks} | {bare:,.0f} | {replay:,.0f} | {replay / bare:.2f} | {claim:,.0f} | {claim / bare:.2f} |")
    print()


def stores():
    print("### Store round trips (1 KiB payload; Redis and PostgreSQL on loopback)\n")
    print("| store | claim + complete (fresh key) | claim that finds the record (replay) |")
    print("|---|---:|---:|")
    for name in ["memory", "redis", "postgres"]:
        if have("store", f"{name}_claim_complete"):
            cc = mean_ns("store", f"{name}_claim_complete")
            rp = mean_ns("store", f"{name}_replay")
            print(f"| {name} | {fmt_time(cc)} | {fmt_time(rp)} |")
        else:
            print(f"| {name} | skipped (no server) | skipped |")
    print()


if __name__ == "__main__":
    if not os.path.isdir(ROOT):
        sys.exit("no target/criterion: run `cargo bench` first")
    layer()
    fingerprint()
    contention()
    stores()
