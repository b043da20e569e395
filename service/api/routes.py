"""The paths the server answers, by what the edge does with them (metrics labels, keys, disconnects, logs)."""

from __future__ import annotations

# Routes whose callers are trainers' own clients, which retry blindly and hide an error's body
# (OpenRLHF logs only the status): their 4xx reasons are logged at WARNING.
TRAINER_ROUTES = frozenset({"/get_reward", "/v1/reward", "/classify", "/v1/classify"})
# Scoring requests stop when their client goes away, so their items are not scored for no one.
SCORING_ROUTES = frozenset({"/v1/score"}) | TRAINER_ROUTES
# What load balancers and Kubernetes poll: no access line for them unless RMSERVE_LOG_PROBES is on.
PROBE_ROUTES = frozenset({"/health/live", "/health/ready"})
# Health and metrics stay open: who may reach them is the network policy's business.
OPEN_ROUTES = frozenset(
    {"/metrics", "/health/live", "/health/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
)
# Every path the metrics label by name; anything else is "other" (a label per unknown path would grow
# without bound).
ROUTES = SCORING_ROUTES | {
    "/v1/models",
    "/info",
    "/metrics",
    "/health/live",
    "/health/ready",
    "/docs",
    "/openapi.json",
}
