"""FedAvg rounds of the NIID-Bench CNN in PyTorch: the peer of bench/cnn.R.

The same network as fedagg's model_cnn() (conv 6@5x5, ReLU, max pool 2,
conv 16@5x5, ReLU, max pool 2, dense 120, ReLU, dense 84, ReLU, dense 10),
from the same initial parameters: fedagg's flat vector is read and laid out
as torch's tensors (a convolution's weights are fedagg's (kh, kw, c) rows per
filter; the flattened image is permuted to fedagg's height-width-channel
order before the dense layers, so both compute the same function). Clients'
minibatches in row order (fedagg runs with shuffle = FALSE), plain SGD,
CrossEntropyLoss (mean over the batch), then the sample-weighted mean.

Prints the median ms per round on stdout; with --out, writes the parameters
after the last repetition, in fedagg's order, as float64.
"""
import argparse
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(256, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def layout(model):
    """(tensor, reader) pairs in fedagg's parameter order."""
    out = []
    for conv in (model.conv1, model.conv2):
        o, c, k, _ = conv.weight.shape
        out.append((conv.weight, lambda v, o=o, c=c, k=k: v.reshape(o, k, k, c).transpose(0, 3, 1, 2), o * c * k * k))
        out.append((conv.bias, lambda v: v, o))
    for lin in (model.fc1, model.fc2, model.fc3):
        o, i = lin.weight.shape
        out.append((lin.weight, lambda v, o=o, i=i: v.reshape(o, i), o * i))
        out.append((lin.bias, lambda v: v, o))
    return out


def load(model, flat):
    pos = 0
    with torch.no_grad():
        for tensor, read, n in layout(model):
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(read(flat[pos:pos + n]))))
            pos += n


def dump(model):
    parts = []
    for tensor, _, _ in layout(model):
        t = tensor.detach().double().numpy()
        if t.ndim == 4:  # o, c, kh, kw -> o, kh, kw, c
            t = t.transpose(0, 2, 3, 1)
        parts.append(t.reshape(-1))
    return np.concatenate(parts)


def fedavg_round(global_model, client_model, clients, batch, lr):
    opt = torch.optim.SGD(client_model.parameters(), lr=lr)
    total = sum(len(yk) for _, yk in clients)
    acc = [torch.zeros_like(p) for p in global_model.parameters()]
    for xk, yk in clients:
        with torch.no_grad():
            for pc, pg in zip(client_model.parameters(), global_model.parameters()):
                pc.copy_(pg)
        for start in range(0, len(yk), batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(client_model(xk[start:start + batch]), yk[start:start + batch]).backward()
            opt.step()
        with torch.no_grad():
            for a, p in zip(acc, client_model.parameters()):
                a.add_(p, alpha=len(yk) / total)
    with torch.no_grad():
        for pg, a in zip(global_model.parameters(), acc):
            pg.copy_(a)


def main():
    p = argparse.ArgumentParser()
    for name in ("x", "y", "init"):
        p.add_argument("--" + name, required=True)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    x = torch.from_numpy(np.fromfile(args.x, dtype=np.float64).reshape(-1, 784)).to(dtype)
    y = torch.from_numpy(np.fromfile(args.y, dtype=np.float64).astype(np.int64))
    init = np.fromfile(args.init, dtype=np.float64)
    per = len(y) // args.clients
    clients = [(x[k * per:(k + 1) * per], y[k * per:(k + 1) * per]) for k in range(args.clients)]
    global_model, client_model = Net(), Net()
    load(global_model, init)
    fedavg_round(global_model, client_model, clients, args.batch, args.lr)  # warm-up
    times = []
    for _ in range(args.reps):
        load(global_model, init)
        started = time.perf_counter()
        for _ in range(args.rounds):
            fedavg_round(global_model, client_model, clients, args.batch, args.lr)
        times.append(time.perf_counter() - started)
    print(1000 * float(np.median(times)) / args.rounds)
    if args.out:
        dump(global_model).tofile(args.out)


if __name__ == "__main__":
    main()
