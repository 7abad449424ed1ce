#!/bin/sh
# preStop hook for a Ray worker Pod serving dsstream (deploy/rayservice.yaml).
#
# Asks the GCS to drain this node: Serve starts replacement replicas on other
# nodes and stops this node's replicas gracefully (no new sessions; open ones
# go on for up to their drain timeout, graceful_shutdown_timeout_s).  Waits
# until no dsstream replica is left here, at most DRAIN_S seconds, then stops
# Ray.  Keep DRAIN_S at the deployment's drain_timeout_s and the Pod's
# terminationGracePeriodSeconds above it.
set -u
DRAIN_S="${DRAIN_S:-600}"
ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION \
    --reason-message="pod terminating: draining dsstream sessions" \
    --deadline-remaining-seconds="$DRAIN_S" || true
waited=0
while pgrep -f "ServeReplica:dsstream" >/dev/null 2>&1 && [ "$waited" -lt "$DRAIN_S" ]; do
    sleep 2
    waited=$((waited + 2))
done
ray stop
