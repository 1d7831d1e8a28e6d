"""The nodes' side: train one epoch on the node's own data, send the new parameters."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedaggbench.task import load, train_epoch

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    node = int(context.node_config["partition-id"])
    x, y = load(str(cfg["data-dir"]), node, int(cfg["n-features"]))
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    w = np.array(w, dtype=np.float64, copy=True)
    b = np.array(b, dtype=np.float64, copy=True)
    rnd = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng(1000 * rnd + node)
    w, b, loss = train_epoch(w, b, x, y, float(cfg["lr"]), int(cfg["batch-size"]), rng)
    content = RecordDict({
        "arrays": ArrayRecord([w, b]),
        "metrics": MetricRecord({"train_loss": float(loss), "num-examples": int(len(y))}),
    })
    return Message(content=content, reply_to=msg)
