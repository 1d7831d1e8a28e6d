"""Raw loopback copy, the baseline of fedagg's upload throughput (bench/network.R).

One process listens on 127.0.0.1 (a free port), another connects once and
sends `--bytes` bytes `--reps` times over the same connection; after each
message the receiver, having read all of it into a buffer, answers one byte.
Prints one JSON line: the median, best and all times of one message.
Standard library only.
"""

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import time


def receive(listener, n, reps):
    conn, _ = listener.accept()
    buf = bytearray(n)
    view = memoryview(buf)
    try:
        for _ in range(reps):
            got = 0
            while got < n:
                k = conn.recv_into(view[got:], n - got)
                if k == 0:
                    return
                got += k
            conn.sendall(b"k")
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, default=8_000_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    total = a.reps + a.warmup
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=receive, args=(listener, a.bytes, total), daemon=True)
    proc.start()
    listener.close()
    payload = bytes(bytearray(i % 251 for i in range(a.bytes)))
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for i in range(total):
            t0 = time.perf_counter()
            s.sendall(payload)
            if s.recv(1) != b"k":
                raise RuntimeError("the receiver did not answer")
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
    finally:
        s.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    med = statistics.median(times)
    print(json.dumps({"bytes": a.bytes, "reps": a.reps, "median_s": med, "best_s": min(times),
                      "mb_per_s": a.bytes / med / 1e6, "times": times}))


if __name__ == "__main__":
    main()
