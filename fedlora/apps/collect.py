"""Collecting a round's contributions from the sampled sites: in the clear or as a secure sum.

Either way the round loop gets the same `RoundInputs`: the per-key SUMS of the contributions
(all a strategy's server half sees), the metrics of the sites that contributed, and who failed,
refused or has spent its privacy budget. Only plaintext rounds have individual contributions
(for the diagnostics that need each site's factors); under secure aggregation the sites'
statistics arrive as sums too (`stats`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedlora import transport
from fedlora.apps import records
from fedlora.apps.discovery import exchange, no_reply
from fedlora.apps.evidence import Evidence
from fedlora.apps.secure import NextRound, PreparedSession, secure_sum
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.privacy.policy import BudgetExhausted
from fedlora.strategies.base import Arrays, sum_contributions


@dataclass
class RoundInputs:
    """What a round collected from the sites, however it was collected."""

    sums: Arrays = field(default_factory=dict)  # per-key sums of the contributions
    metrics: list = field(default_factory=list)  # MetricRecord of each contributing site
    contributions: list[Arrays] = field(default_factory=list)  # individual: plaintext only
    failures: list[str] = field(default_factory=list)
    exhausted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # site -> why its policy refused
    #: secure aggregation: the summed statistics (records.STATS keys), no per-site metrics
    stats: Arrays = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    transport_error_down: float = 0.0  # relative L2 round-trip error of the adapter sent
    #: secure aggregation: seconds of each stage (keys, share, mask, unmask)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: secure aggregation: the next round's session, set up during this round (secure.pipeline)
    prepared: PreparedSession | None = None
    next_refused: dict[int, str] = field(default_factory=dict)  # site -> why not that session
    #: secure aggregation with signed inputs: the round's sum as the next round's sites with a
    #: roster recompute it (fedlora.apps.evidence)
    evidence: Evidence | None = None


def secure_threshold(cfg: Config, sampled: int) -> int:
    """The secure-aggregation threshold t of a round of `sampled` sites: the shares that rebuild
    a site's secrets, so the fewest surviving inputs the round's sum may hold. secure.threshold,
    else the larger of federation.min_clients and two thirds of the sampled sites (SecAgg needs
    a majority). Each site splits its distributed noise over its session's t
    (fedlora.privacy.client_level.noise_shares)."""
    if cfg.secure.threshold:
        return min(cfg.secure.threshold, sampled)
    return min(sampled, max(cfg.federation.min_clients, math.ceil(2 * sampled / 3)))


def dropout_warning(cfg: Config, sites: int) -> str:
    """What an operator must know up front: under secure aggregation a round that needs every
    sampled site ends the federation when one drops out ("" when a dropout is survivable)."""
    if not cfg.secure.enabled:
        return ""
    federation = cfg.federation
    sampled = min(sites, max(federation.min_clients, math.ceil(federation.fraction * sites)))
    # a round needs the threshold's inputs, and the sites unmask no sum of fewer than min_cohort
    if max(secure_threshold(cfg, sampled), cfg.secure.min_cohort) < sampled:
        return ""
    return (
        f"Note: secure aggregation with {sampled} sites per round needs all {sampled}: a site "
        "that drops out during a round ends the federation (it can be resumed with --resume). "
        "More sites, or a larger federation.fraction, leave room for a dropout."
    )


def collect_plain(
    grid: Grid,
    msgs: list[Message],
    bytes_down: int,
    global_arrays: Arrays,
    global_wire: Arrays,
    progress: Callable[[int], None],
    timeout: float | None,
    name_of_node: Callable[[int], str],
) -> RoundInputs:
    """Send the round's TRAIN messages, wait for the replies (at most `timeout` seconds), and
    read them: `global_wire` is the global adapter as it was sent (for the round-trip error of
    transport.dtype). A site that has not answered in time is a failure of this round."""
    replies, silent = exchange(grid, msgs, progress, timeout)
    inputs = read_plain_replies(replies, global_arrays)
    inputs.failures += [no_reply(name_of_node(node), timeout) for node in silent]
    inputs.bytes_down = bytes_down
    inputs.transport_error_down = transport.round_trip_error(
        global_arrays, transport.decode(global_wire)
    )
    return inputs


def read_plain_replies(replies: list[Message], global_arrays: Arrays) -> RoundInputs:
    """The contributions, metrics, failures, refusals and spent budgets of a plaintext round's
    replies, summed in site order."""
    inputs = RoundInputs()
    # site order, not arrival order: float sums must not depend on which site finished first
    replies = sorted(
        replies,
        key=lambda m: (
            -1
            if m.has_error() or records.SITE_METRICS not in m.content
            else int(m.content[records.SITE_METRICS][records.SITE_ID])
        ),
    )
    for reply in replies:
        if reply.has_error():
            inputs.failures.append(reply.error.reason)
            continue
        if records.REFUSAL in reply.content:
            refusal = reply.content[records.REFUSAL]
            inputs.refused[int(refusal[records.SITE_ID])] = str(refusal[records.REASON])
            continue
        metrics = reply.content[records.SITE_METRICS]
        if int(metrics.get(records.EXHAUSTED, 0)):
            inputs.exhausted.append(int(metrics[records.SITE_ID]))
            continue
        try:
            wire = records.from_record(reply.content[records.CONTRIBUTION])
        except FedloraError as exc:
            raise FedloraError(f"Site {int(metrics[records.SITE_ID])}'s update: {exc}") from None
        arrays = transport.decode(wire)
        check_contribution(arrays, global_arrays)
        inputs.contributions.append(arrays)
        inputs.metrics.append(metrics)
        inputs.bytes_up += records.payload_bytes(wire)
    if inputs.contributions:
        inputs.sums = sum_contributions(inputs.contributions)
    return inputs


def collect_secure(
    grid: Grid,
    site_nodes: dict[int, int],
    content: RecordDict,
    threshold: int,
    progress: Callable[[str], None],
    prepared: PreparedSession | None = None,
    upcoming: NextRound | None = None,
    timeout: float | None = None,
) -> RoundInputs:
    """One round under secure aggregation (fedlora.apps.secure): the sums, and the statistics
    the sites put inside them; `prepared`, `upcoming`, `timeout`: as in `secure_sum`. Raises
    SecureRoundFailed (naming the refusals) when the session cannot complete."""
    result = secure_sum(
        grid,
        site_nodes,
        content,
        threshold,
        progress,
        timeout=timeout,
        prepared=prepared,
        upcoming=upcoming,
    )
    sums, stats = records.split_stats(result.sums)
    inputs = RoundInputs(
        sums=sums,
        metrics=[result.metrics[s] for s in sorted(result.sites)],
        refused=result.refused,
        stats=stats,
        bytes_up=sum(result.bytes_up.values()),
        bytes_down=sum(result.bytes_down.values()),
        stage_seconds=result.seconds,
        prepared=result.prepared,
        next_refused=result.next_refused,
        evidence=result.evidence,
    )
    for failure in result.failures:
        found = re.search(r"site (\d+)", failure)
        if BudgetExhausted.MARK in failure and found:
            inputs.exhausted.append(int(found.group(1)))
        else:
            inputs.failures.append(failure)
    return inputs


def check_contribution(arrays: Arrays, global_arrays: Arrays) -> None:
    """Replies are checked at the boundary: every tensor must be a LoRA tensor of this adapter
    (or a strategy scalar), so nothing else can travel unnoticed."""
    for key in arrays:
        name = key.split("/", 1)[1] if "/" in key else None
        if name is not None and name not in global_arrays:
            raise FedloraError(f"A site sent tensor {key!r}, which is not part of the adapter.")
