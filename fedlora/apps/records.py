"""Message layout: every record key in one place, and arrays <-> Flower records."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedlora.errors import FedloraError

Arrays = dict[str, np.ndarray]

# server -> site
GLOBAL_ADAPTER = "global_adapter"  # ArrayRecord: the LoRA A/B tensors of the global adapter
BROADCAST = "broadcast"  # ArrayRecord: strategy server state (SCAFFOLD's c), may be empty
ROUND_CONFIG = "round_config"  # ConfigRecord: round number
#: ArrayRecord, where the sites check the aggregate (fedlora.apps.evidence): the server
#: optimiser's state (momentum, second moment), which the next adapter depends on besides the sum
SERVER_STATE = "server_state"
ROUND = "round"

# site -> server
CONTRIBUTION = "contribution"  # ArrayRecord: the strategy's already-weighted vectors, to be summed
SITE_METRICS = "site_metrics"  # MetricRecord
SITE_ID = "site"
TRAIN_LOSS = "train_loss"
LOCAL_STEPS = "local_steps"
NUM_EXAMPLES = "num_examples"
RANK = "rank"  # the LoRA rank the site trained at (its leading slice of the global adapter)
PRIVACY = "privacy."  # prefix of a site's privacy spend: epsilon, delta, noise_multiplier, ...
CLIP_SCALE = "clip_scale"  # client-level DP: the factor the site's update was scaled by (<= 1)
#: in a contribution (federation.participation = "poisson"): 1 if the site took part, 0 for the
#: masked zero it sends when its coin says no; summed, the number of sites that took part
PARTICIPANT = "participant"
EXHAUSTED = "budget_exhausted"  # 1: the site refused the round (privacy.max_epsilon reached)
#: relative L2 error of the contribution's round trip through transport.dtype (plaintext only)
TRANSPORT_ERROR = "transport_error"
REFUSAL = "refusal"  # ConfigRecord: the site's policy refused the request; SITE_ID, ROUND, REASON
REASON = "reason"
#: prefix of the shape-(1,) statistics a site adds to its contribution under secure aggregation
#: (summed with it, never seen per site): training loss times rows, rows, epsilon
STATS = "stats/"
STATS_LOSS = STATS + "loss_x_rows"
STATS_ROWS = STATS + "rows"
STATS_EPSILON = STATS + "epsilon"
STATS_UNBOUNDED = STATS + "epsilon_infinite"  # sites whose epsilon is infinite (no noise)


def split_stats(sums: Arrays) -> tuple[Arrays, Arrays]:
    """A secure sum's strategy sums and the statistics the sites put inside it (STATS keys)."""
    stats = {k: v for k, v in sums.items() if k.startswith(STATS)}
    return {k: v for k, v in sums.items() if k not in stats}, stats


# personalisation (site -> server, after the last round)
GLOBAL_ACCURACY = "global_accuracy"
PERSONAL_ACCURACY = "personal_accuracy"
GLOBAL_LOSS = "global_loss"
PERSONAL_LOSS = "personal_loss"
HELD_OUT_ROWS = "held_out_rows"
PERSONALIZE_STEPS = "personalize_steps"


#: the one Array of a record: a JSON header (keys, dtypes, shapes), then every array's bytes
PACKED = "packed"


def to_record(arrays: Arrays) -> ArrayRecord:
    """All arrays as one byte Array. Flower sends every Array of a record as objects of their
    own, each one request through the SuperLink (and, at a site, its SuperNode): the default
    adapter's 120 tensors were 242 objects per message, and with 10 site daemons on two cores
    plaintext rounds took twice as long as secure ones, whose masked input is one array."""
    if not arrays:
        return ArrayRecord()
    parts = [np.ascontiguousarray(v) for v in arrays.values()]
    header = json.dumps(
        [[k, v.dtype.str, list(v.shape)] for k, v in zip(arrays, parts, strict=True)]
    ).encode()
    data = b"".join([len(header).to_bytes(8, "little"), header, *(v.tobytes() for v in parts)])
    return ArrayRecord(array_dict={PACKED: Array.from_numpy_ndarray(np.frombuffer(data, np.uint8))})


def from_record(record: ArrayRecord) -> Arrays:
    """The arrays of a `to_record` record, in their order, as writable copies. A record that is
    not one (a faulty or hostile sender) raises FedloraError saying so, never a stray
    decoding error."""
    if not record:
        return {}
    try:
        data = record[PACKED].numpy().tobytes()
        size = int.from_bytes(data[:8], "little")
        offset = 8 + size
        arrays: Arrays = {}
        for key, dtype, shape in json.loads(data[8:offset]):
            dtype = np.dtype(dtype)
            if not all(isinstance(n, int) and n >= 0 for n in shape) or dtype.hasobject:
                raise ValueError(f"tensor {key!r}: shape {shape}, dtype {dtype}")
            count = math.prod(shape)
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            arrays[str(key)] = flat.reshape(shape).copy()
            offset += count * dtype.itemsize
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes past the last tensor")
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise FedloraError(
            f"Malformed tensor record ({type(exc).__name__}: {exc}): not one that fedlora's "
            "to_record wrote (a faulty sender, or one of another fedlora version)."
        ) from None
    return arrays


def payload_bytes(arrays: Arrays) -> int:
    """Bytes of tensor data carried by a message (what a site sends or receives)."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


def payload_digest(arrays: Arrays) -> str:
    """SHA-256 over every tensor in name order: name, dtype, shape, then the raw bytes (C
    order). Anyone holding the same tensors gets the same digest."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def content_arrays(content: RecordDict) -> Arrays:
    """A round's training content as one set of arrays: the global adapter (`global/`), the
    strategy's broadcast state (`broadcast/`), the server optimiser's state where it travels
    (`server/`) and the round number (`round`)."""
    arrays = {f"global/{k}": v for k, v in from_record(content[GLOBAL_ADAPTER]).items()}
    arrays |= {f"broadcast/{k}": v for k, v in from_record(content[BROADCAST]).items()}
    arrays |= {f"server/{k}": v for k, v in server_state(content).items()}
    arrays["round"] = np.array([int(content[ROUND_CONFIG][ROUND])])
    return arrays


def server_state(content: RecordDict) -> Arrays:
    """The server optimiser's state a round's content carries ({}: none)."""
    return from_record(content[SERVER_STATE]) if SERVER_STATE in content else {}


def content_digest(content: RecordDict) -> bytes:
    """What a round's training content is, as every site of the round must have received it."""
    return arrays_digest(content_arrays(content))


def arrays_digest(arrays: Arrays) -> bytes:
    """`content_digest` of content given as `content_arrays`."""
    return bytes.fromhex(payload_digest(arrays))


def session_terms(
    run_config_digest: bytes,
    threshold: int,
    value_bound: float,
    cohort: list[int],
    content: RecordDict | None,
) -> bytes:
    """What a secure-aggregation session's keys come with, as every site of the session must
    have received it: the federation's run config (fedlora.deploy.runconfig.digest), the
    session's threshold and value bound (a site splits its distributed noise over its own t),
    the sites the server asked into the session (2t exceeds their number, so no two survivor
    sets can each be confirmed by t of them: fedlora.secure.secagg) and, in a session set up in
    its own round, the round's training content (None: a session set up during the round
    before, whose content does not exist yet)."""
    h = hashlib.sha256(b"run config\n" + run_config_digest)
    terms = {"threshold": threshold, "value_bound": value_bound, "cohort": sorted(cohort)}
    h.update(json.dumps(terms).encode())
    if content is not None:
        h.update(b"content\n" + content_digest(content))
    return h.digest()


# secure aggregation (fedlora/apps/secure.py): four or five stages per session, message types
# "query.secagg" (keys with the round's training content, shares, confirmation of the survivors,
# unmasking) and "train.secagg" (send the trained, masked input); the next round's keys and
# shares may ride on this round's mask and unmask messages (SECAGG_NEXT)
SECAGG_ACTION = "secagg"
SECAGG = "secagg"  # ConfigRecord, both directions: the stage's protocol fields below
#: ConfigRecord, both directions: the next round's session's keys or share stage, carried by
#: this round's mask or unmask message and its reply; a site that refuses it answers REASON
SECAGG_NEXT = "secagg_next"
SECAGG_STAGE = "stage"  # "keys" | "share" | "mask" | "confirm" | "unmask"
PROTOCOL = "protocol"  # the secure-aggregation protocol's version (keys stage, both ways)
THRESHOLD = "threshold"  # t: shares needed to rebuild a secret
COHORT = "cohort"  # the sites the server asks into the session (keys stage)
#: a site's keys reply (signed with its keys), and the share message (aligned with SITES): True
#: for a site with a roster of its peers ([peers]), which checks what they signed and reveals
#: the mask keys of sites that dropped only for a survivor set that t sites confirmed: the
#: server then runs the confirm stage in a round where a site dropped
ROSTERED = "rostered"
VALUE_BOUND = "value_bound"  # largest |value| a site may contribute
SITES = "sites"  # site ids, aligned with C_PKS and S_PKS
C_PKS = "c_pks"  # share-channel public keys
S_PKS = "s_pks"  # mask public keys
# who signed each site's keys (fedlora.secure.identity), aligned with SITES; "" / b"": unsigned;
# in a mask reply (one each), a confirm message and an unmask message without CONFIRMED
# (aligned with SURVIVORS): who signed the digest of the training content that site trained
# from; in a confirm reply (one each) and an unmask message with CONFIRMED (aligned with it):
# who signed the survivor set
SIGNER_NAMES = "signer_names"
SIGNER_KEYS = "signer_keys"  # the signers' node-authentication public keys (OpenSSH)
SIGNATURES = "signatures"
#: a mask reply's second signature (same signer as SIGNATURES): on its masked input, with the
#: content, seed commitment and mask key (fedlora.secure.identity.input_statement)
INPUT_SIGNATURES = "input_signatures"
PEERS = "peers"  # site ids, aligned with CIPHERTEXTS (recipients up, senders down)
CIPHERTEXTS = "ciphertexts"  # encrypted Shamir shares
SURVIVORS = "survivors"  # sites whose masked input is in the sum, aligned with B_SHARES
DROPPED = "dropped"  # sites that shared keys but sent no input, aligned with S_SHARES
CONFIRMED = "confirmed"  # the sites that confirmed the survivor set (unmask stage, after one)
B_SHARES = "b_shares"  # shares of the survivors' self-mask seeds
S_SHARES = "s_shares"  # shares of the dropped sites' mask keys
#: ArrayRecord: a site's masked input, uint64 words (64-bit values, then 32-bit lanes two a word)
SECAGG_MASKED = "secagg_masked"
SECAGG_LAYOUT = "secagg_layout"  # ConfigRecord: keys and shapes of the packed contribution
#: with a round's training content, when the round before's sites signed their inputs: what a
#: site needs to recompute that round's secure sum and check the global adapter against it
#: (fedlora.apps.evidence); ConfigRecord of fields, ArrayRecord of the content and inputs
EVIDENCE = "evidence"
EVIDENCE_ARRAYS = "evidence_arrays"
SEEDS = "seeds"  # in the evidence, aligned with SURVIVORS: their rebuilt self-mask seeds
MASK_KEYS = "mask_keys"  # in the evidence, aligned with DROPPED: their rebuilt mask keys
SECAGG_STATE = "fedlora_secagg_state"  # ConfigRecord in context.state: the site's session
#: ConfigRecord in context.state: the next round's session, prepared during this round's stages
SECAGG_NEXT_STATE = "fedlora_secagg_next_state"
PENDING_STATE = "fedlora_pending_state"  # ArrayRecord in context.state: state saved on unmask
LOCAL_SPEND = "fedlora_local_spend"  # MetricRecord in context.state: epsilon, for the audit log
#: ConfigRecord in context.state: the digest of the content the site trained from, until unmask
CONTENT_DIGEST = "fedlora_content_digest"
#: prefix of context.state keys: the round's training content, kept from the keys stage to the
#: mask stage by a site that trains there
ROUND_CONTENT = "fedlora_round_content."
