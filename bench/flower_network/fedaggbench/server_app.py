"""The server's side: FedAvg over all nodes, no federated evaluation.

The time of every round boundary goes to `out-file`, one line each
(`stamp <round> <unix time>`, round 0 being the start of round 1), with the
ServerApp process's peak memory (`peak_kib`) and `done` at the end.
"""

import os
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def _peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def _write(path, stamps, done):
    lines = [f"stamp {r} {t:.6f}" for r, t in stamps] + [f"peak_kib {_peak_kib()}"]
    if done:
        lines.append("done")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    p, c = int(cfg["n-features"]), int(cfg["n-classes"])
    n_nodes = int(cfg["num-nodes"])
    out = str(cfg["out-file"])
    stamps = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower calls it before round 1 and after every round.
        stamps.append((server_round, time.time()))
        _write(out, stamps, False)
        return MetricRecord({"round": server_round})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_nodes,
                      min_available_nodes=n_nodes)
    initial = ArrayRecord([np.zeros((p, c)), np.zeros(c)])
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["lr"])}), evaluate_fn=stamp)
    _write(out, stamps, True)
