"""Message layout: every record key in one place, and arrays <-> Flower records."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Arrays = dict[str, np.ndarray]

# server -> site
GLOBAL_ADAPTER = "global_adapter"  # ArrayRecord: the LoRA A/B tensors of the global adapter
BROADCAST = "broadcast"  # ArrayRecord: strategy server state (SCAFFOLD's c), may be empty
ROUND_CONFIG = "round_config"  # ConfigRecord: round number
ROUND = "round"

# site -> server
CONTRIBUTION = "contribution"  # ArrayRecord: the strategy's already-weighted vectors, to be summed
SITE_METRICS = "site_metrics"  # MetricRecord
SITE_ID = "site"
TRAIN_LOSS = "train_loss"
LOCAL_STEPS = "local_steps"
NUM_EXAMPLES = "num_examples"

# personalisation (site -> server, after the last round)
GLOBAL_ACCURACY = "global_accuracy"
PERSONAL_ACCURACY = "personal_accuracy"
GLOBAL_LOSS = "global_loss"
PERSONAL_LOSS = "personal_loss"
HELD_OUT_ROWS = "held_out_rows"
PERSONALIZE_STEPS = "personalize_steps"

# site state kept across rounds (Flower's context.state)
CLIENT_STATE = "fedlora_client_state"


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(arrays: Arrays) -> int:
    """Bytes of tensor data carried by a message (what a site sends or receives)."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
