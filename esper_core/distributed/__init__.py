"""Training under ``torchrun``: several ranks, one decision.

How the ranks stay one run. Every rank runs the same deterministic growth code
(:class:`esper_core.growth.controller.GrowthController`) on inputs that are identical everywhere:

- host gradients are averaged by DDP before the controller reads them (gradient merit);
- the activation and functional-gradient statistics of a measurement are all-reduced before they
  are folded into the running averages (:class:`esper_core.policy.signals.StatBank`), so every
  rank's data counts and every rank holds the same averages;
- the losses the controller reads (plateau, gate, governor), and the governor's non-finite flag,
  are all-reduced at the read;
- validation and counterfactual verdicts evaluate each rank's shard of the held-out set and reduce
  the sums and gather the per-sample scores (:mod:`esper_core.distributed.data`);
- the policy's own randomness (bandit draws) comes from the run seed; kernels are all compiled (by
  rank 0, into the shared cache) before the first step, so no seed waits for a compile on one rank
  and not on another.

Why not "rank 0 decides and broadcasts the decision": a checkpoint is written by rank 0 alone and
loaded by every rank, and a rollback restores each rank's own snapshot, so the policy's, selector's,
plateau tracker's, governor's and signals' state must be identical on every rank anyway — which
requires exactly the reductions above. Once the inputs are identical, the decision (layer, slot,
blueprint, kernel address, initial-weight seed drawn from run seed/step/layer/slot, and its step)
is identical too, and broadcasting it would carry nothing new; the remaining risk, a divergence
(a bug, or nodes with separate kernel caches characterising kernels differently), is caught where
it matters: before each DDP rebuild the ranks compare a digest of their seed topologies
(:class:`esper_core.distributed.replica.Replica`) and stop with an error if they differ.
"""

from esper_core.distributed.data import digest, shard
from esper_core.distributed.replica import Replica
from esper_core.distributed.world import (PeerLost, RanksDiverged, RankStalled, World, describe_ranks, join,
                                          launched, peer_lost, timed_out)

__all__ = ["PeerLost", "RankStalled", "RanksDiverged", "Replica", "World", "describe_ranks", "digest", "join",
           "launched", "peer_lost", "shard", "timed_out"]
