#!/usr/bin/env python3
"""The fastest a durable majority commit can be on the disk under $TMPDIR, with no network and no
software in the way: three processes (the three nodes of a loopback cluster) each own a
zero-filled file; at the same instant they each write one record and fdatasync it; the round's
commit time is when the second of them is done (a majority of three), counted from when the first
(the leader) started; `--stagger-us` starts the other two that much later, as a network hop would. Rounds start at a fixed
period, each process spinning for the start instant so no wake-up delay is counted. Prints the
p50, p99 and p99.9 of the commit time, and of a lone process's write + fdatasync for reference.

Any Raft implementation on this machine that keeps the durability contract (a write is answered
only once a majority has it on disk) pays at least this per write, plus its network hops.

    scripts/commit-floor.py [--rounds 3000] [--period-us 1000] [--bytes 200] [--stagger-us 0]
"""
import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

SPIN_US = 300


def wait_until(deadline_ns):
    """Sleeps until shortly before `deadline_ns`, then spins to it."""
    early = deadline_ns - SPIN_US * 1000 - time.monotonic_ns()
    if early > 0:
        time.sleep(early / 1e9)
    while time.monotonic_ns() < deadline_ns:
        pass


def node(start_ns, delay_ns, rounds, period_ns, size, ends):
    """One node: a write + fdatasync every `period_ns` from `start_ns`;
    `ends[k]` is when round k's was done, counted from `start_ns` + k periods."""
    fd, path = tempfile.mkstemp(prefix="commit-floor.")
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
        buf, offset = b"x" * size, 0
        for k in range(rounds):
            at = start_ns + k * period_ns
            wait_until(at + delay_ns)
            os.pwrite(fd, buf, offset)
            os.fdatasync(fd)
            ends[k] = time.monotonic_ns() - at
            offset = (offset + size) % (1 << 20)
    finally:
        os.close(fd)
        os.unlink(path)


def percentiles(samples):
    """p50, p99 and p99.9 of `samples` (ns), in µs."""
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))] / 1000
    return {"p50": pick(0.5), "p99": pick(0.99), "p99.9": pick(0.999)}


def show(found):
    return ", ".join(f"{name} {us:.0f} µs" for name, us in found.items())


def run(processes, rounds, period_ns, size, stagger_ns=0):
    ends = [mp.Array("q", rounds, lock=False) for _ in range(processes)]
    start_ns = time.monotonic_ns() + 200_000_000
    workers = [
        mp.Process(target=node, args=(start_ns, stagger_ns if i else 0, rounds, period_ns, size, ends[i]))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise SystemExit(f"a node process failed (exit code {worker.exitcode})")
    return ends


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--period-us", type=int, default=1000)
    parser.add_argument("--bytes", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON object, latencies in µs")
    parser.add_argument(
        "--stagger-us", type=int, default=0,
        help="followers start this much after the leader (a network hop)")
    args = parser.parse_args()
    period_ns = args.period_us * 1000
    lone = percentiles(run(1, args.rounds, period_ns, args.bytes)[0])
    ends = run(3, args.rounds, period_ns, args.bytes, args.stagger_us * 1000)
    commit = percentiles([sorted(e[k] for e in ends)[1] for k in range(args.rounds)])
    late = sum(1 for k in range(args.rounds) if max(e[k] for e in ends) > period_ns)
    if args.json:
        print(json.dumps({"lone_write_us": lone, "majority_commit_us": commit, "overran_rounds": late}))
        return
    print(f"1 process, write + fdatasync: {show(lone)}")
    print(f"3 processes, second of three durable (majority commit): {show(commit)}")
    print(f"  rounds where a process overran the {args.period_us} µs period: {late} of {args.rounds}")


if __name__ == "__main__":
    main()
