"""FedAvg rounds in plain numpy: the peer of bench/models.R (run by it).

Per client: shuffled minibatches, forward and backward pass with `@` matrix
products (ReLU hidden layers, softmax cross-entropy head, mean loss over the
batch), a plain SGD step; then the sample-weighted mean of the client models.
Threads come from OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS,
which the caller sets in this process's environment.

Prints the median ms per round on stdout (one number) and
`accuracy <training accuracy after the last timed repetition>` on stderr.
"""
import argparse
import sys
import time

import numpy as np


def read_inputs(args, dtype):
    sizes = [int(s) for s in args.sizes.split(",")]
    # R writes column-major matrices: an n x d matrix reads as d x n, transposed.
    x = np.fromfile(args.x, dtype=np.float64)
    n = x.size // sizes[0]
    x = np.ascontiguousarray(x.reshape(sizes[0], n).T, dtype=dtype)
    y = np.fromfile(args.y, dtype=np.int32).astype(np.intp)
    flat = np.fromfile(args.init, dtype=np.float64)
    params, pos = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        W = flat[pos:pos + fan_in * fan_out].reshape(fan_out, fan_in).T  # W is in x out, as in fedagg
        pos += fan_in * fan_out
        b = flat[pos:pos + fan_out]
        pos += fan_out
        params.append((np.ascontiguousarray(W, dtype=dtype), b.astype(dtype)))
    return x, y, params


def forward(params, x):
    acts = [x]
    for l, (W, b) in enumerate(params):
        h = acts[-1] @ W + b
        if l < len(params) - 1:
            np.maximum(h, 0, out=h)
        acts.append(h)
    return acts


def train_client(params, x, y, batch, lr, rng):
    params = [(W.copy(), b.copy()) for W, b in params]
    order = rng.permutation(len(y))
    for start in range(0, len(y), batch):
        rows = order[start:start + batch]
        acts = forward(params, x[rows])
        z = acts[-1]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        z[np.arange(len(rows)), y[rows]] -= 1
        g = z / len(rows)  # gradient of the mean loss w.r.t. the logits
        for l in reversed(range(len(params))):
            W, b = params[l]
            grad_W = acts[l].T @ g
            grad_b = g.sum(axis=0)
            if l > 0:  # the input gradient of the first layer is not needed
                g = (g @ W.T) * (acts[l] > 0)
            W -= lr * grad_W
            b -= lr * grad_b
    return params


def fedavg_round(params, clients, batch, lr, rng):
    total = sum(len(yk) for _, yk in clients)
    acc = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    for xk, yk in clients:
        w = len(yk) / total
        for (aW, ab), (W, b) in zip(acc, train_client(params, xk, yk, batch, lr, rng)):
            aW += w * W
            ab += w * b
    return acc


def main():
    p = argparse.ArgumentParser()
    for name in ("x", "y", "init", "sizes"):
        p.add_argument("--" + name, required=True)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--threads", type=int, default=1, help="informational: BLAS threads come from the environment")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    x, y, init = read_inputs(args, np.dtype(args.dtype))
    clients = [(xk, yk) for xk, yk in zip(np.array_split(x, args.clients), np.array_split(y, args.clients))]
    rng = np.random.default_rng(args.seed)
    fedavg_round(init, clients, args.batch, args.lr, rng)  # warm-up
    per_round = []
    for _ in range(args.reps):  # every repetition starts from the same initial model
        params = init
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            params = fedavg_round(params, clients, args.batch, args.lr, rng)
        per_round.append((time.perf_counter() - t0) / args.rounds)
    accuracy = np.mean(forward(params, x)[-1].argmax(axis=1) == y)
    print(f"{1000 * float(np.median(per_round)):.6f}")
    print(f"accuracy {accuracy:.6f}", file=sys.stderr)


if __name__ == "__main__":
    main()
