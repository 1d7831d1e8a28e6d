"""FedAvg rounds in PyTorch: the peer of bench/models.R (run by it).

torch.nn Linear layers (ReLU between them), CrossEntropyLoss (mean over the
batch), torch.optim.SGD; per client, shuffled minibatches; then the
sample-weighted mean of the client models. Threads: --threads goes to
torch.set_num_threads (the caller also sets OMP_NUM_THREADS/MKL_NUM_THREADS).

Prints the median ms per round on stdout (one number) and
`accuracy <training accuracy after the last timed repetition>` on stderr.
"""
import argparse
import sys
import time

import numpy as np
import torch
from torch import nn


def build(sizes):
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def load_init(model, path, sizes):
    flat = np.fromfile(path, dtype=np.float64)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    pos = 0
    with torch.no_grad():
        for lin, fan_in, fan_out in zip(linears, sizes[:-1], sizes[1:]):
            # fedagg's W (in x out, column-major) read row-major is out x in: torch's layout.
            lin.weight.copy_(torch.from_numpy(flat[pos:pos + fan_in * fan_out].reshape(fan_out, fan_in)))
            pos += fan_in * fan_out
            lin.bias.copy_(torch.from_numpy(flat[pos:pos + fan_out]))
            pos += fan_out


def fedavg_round(global_model, client_model, clients, batch, lr, gen):
    opt = torch.optim.SGD(client_model.parameters(), lr=lr)  # plain SGD has no state to reset
    loss_fn = nn.CrossEntropyLoss()
    total = sum(len(yk) for _, yk in clients)
    acc = [torch.zeros_like(p) for p in global_model.parameters()]
    for xk, yk in clients:
        with torch.no_grad():
            for pc, pg in zip(client_model.parameters(), global_model.parameters()):
                pc.copy_(pg)
        order = torch.randperm(len(yk), generator=gen)
        for start in range(0, len(yk), batch):
            rows = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(client_model(xk[rows]), yk[rows]).backward()
            opt.step()
        with torch.no_grad():
            for a, p in zip(acc, client_model.parameters()):
                a.add_(p, alpha=len(yk) / total)
    with torch.no_grad():
        for pg, a in zip(global_model.parameters(), acc):
            pg.copy_(a)


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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    sizes = [int(s) for s in args.sizes.split(",")]
    x = np.fromfile(args.x, dtype=np.float64)
    n = x.size // sizes[0]
    x = torch.from_numpy(np.ascontiguousarray(x.reshape(sizes[0], n).T)).to(torch.get_default_dtype())
    y = torch.from_numpy(np.fromfile(args.y, dtype=np.int32).astype(np.int64))
    clients = list(zip(torch.tensor_split(x, args.clients), torch.tensor_split(y, args.clients)))
    global_model, client_model = build(sizes), build(sizes)
    gen = torch.Generator().manual_seed(args.seed)

    load_init(global_model, args.init, sizes)
    fedavg_round(global_model, client_model, clients, args.batch, args.lr, gen)  # warm-up
    per_round = []
    for _ in range(args.reps):  # every repetition starts from the same initial model
        load_init(global_model, args.init, sizes)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            fedavg_round(global_model, client_model, clients, args.batch, args.lr, gen)
        per_round.append((time.perf_counter() - t0) / args.rounds)
    with torch.no_grad():
        accuracy = (global_model(x).argmax(dim=1) == y).double().mean().item()
    print(f"{1000 * float(np.median(per_round)):.6f}")
    print(f"accuracy {accuracy:.6f}", file=sys.stderr)


if __name__ == "__main__":
    main()
