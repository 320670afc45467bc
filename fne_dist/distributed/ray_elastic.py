"""A Ray Train controller callback for a worker range (``dist.min_workers``): after a failed
worker group, refresh the cluster view that Ray's elastic policy sizes the restart from.

Ray 2.60's elastic policy asks Ray Data's AutoscalingCoordinator which workers fit; that actor
re-reads the cluster only every 20 s. Right after a node is lost its view still counts the
node, so the restart asks for the old size, cannot be placed, and waits
``dist.worker_start_timeout_s`` before the next try sees the smaller cluster. A worker that
died with its node is reported after the GCS marked the node dead, so re-reading the cluster at
that moment gives the restart the right size at once. Only a refresh: where the view is still
stale (the GCS has not noticed the loss yet, or this Ray has no such actor), the timeout and
retry path stays as it was.

Imports Ray (and its internals) at module level: imported only by ``run_with_ray``.
"""

from __future__ import annotations

import logging

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback

log = logging.getLogger(__name__)

# ray.get on the coordinator: Ray's own client waits this long for it (5 s) as well
REFRESH_TIMEOUT_S = 5.0


def _coordinator() -> ray.actor.ActorHandle:
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    return get_or_create_autoscaling_coordinator()


class RefreshClusterViewOnFailure(ControllerCallback):
    """Before the controller acts on a failure decision (a retry resizes the next group from
    the coordinator's reservation), make the coordinator re-read the cluster now."""

    def before_controller_execute_failure_decision(self, failure_decision: object) -> None:
        try:
            # recompute=True ticks the coordinator (re-read nodes, re-reserve) before it answers;
            # the requester id only picks which reservation comes back, which is not needed here
            ray.get(
                _coordinator().get_reserved_resources.remote("fne-refresh", recompute=True),
                timeout=REFRESH_TIMEOUT_S,
            )
            # a warning: the controller's stderr reaches the job log, beside Ray's own lines
            log.warning("[fne] cluster view re-read after a failure (%s)", failure_decision)
        except Exception as err:  # another Ray (no recompute), a slow actor: Ray's path stays
            log.warning("could not refresh Ray's cluster view after a failure: %s", err)
