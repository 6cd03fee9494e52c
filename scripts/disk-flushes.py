#!/usr/bin/env python3
"""How many durable writes the disk under $TMPDIR (where the benchmarks keep their data) completes
per second when 1, 2 and 3 processes each loop on a 200-byte pwrite + fdatasync in their own
zero-filled file, as the three nodes of a loopback cluster do. Prints per process count the total
cycles/s and each process's p50 and p99 in µs.

    scripts/disk-flushes.py [--seconds 3] [--bytes 200]
"""
import argparse
import multiprocessing as mp
import os
import tempfile
import time


def run(seconds, size, queue):
    fd, path = tempfile.mkstemp(prefix="disk-flushes.")
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
        buf, offset, took = b"x" * size, 0, []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            t = time.perf_counter()
            os.pwrite(fd, buf, offset)
            os.fdatasync(fd)
            took.append(time.perf_counter() - t)
            offset = (offset + 4096) % (1 << 20)
        took.sort()
        queue.put((len(took) / seconds, took[len(took) // 2] * 1e6, took[int(len(took) * 0.99)] * 1e6))
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--bytes", type=int, default=200)
    args = parser.parse_args()
    for processes in (1, 2, 3):
        queue = mp.Queue()
        workers = [mp.Process(target=run, args=(args.seconds, args.bytes, queue)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        results = [queue.get() for _ in workers]
        for worker in workers:
            worker.join()
        each = ", ".join(f"p50 {p50:.0f} p99 {p99:.0f} µs" for _, p50, p99 in results)
        print(f"{processes} process(es): {sum(r[0] for r in results):,.0f} write + fdatasync cycles/s ({each})")


if __name__ == "__main__":
    main()
