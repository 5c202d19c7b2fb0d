"""Our log lines in a Serve replica's log file.

Serve writes only its own logger, "ray.serve" (which does not propagate), to a replica's log file
(/tmp/ray/session_latest/logs/serve/replica_<app>_<deployment>_<id>.log), and Python's root logger drops INFO, so
lines of other loggers (the access log "gemma.access" included) would be lost. `to_replica_log()` gives our
loggers Serve's handlers and level inside a replica: our lines land in that file, in Serve's format (TEXT or JSON,
`logging_config` of the deployment) and tagged with the request id as Serve's are. Outside a replica it does
nothing, so logging stays the caller's (tests, scripts).
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"
OUR_LOGGERS = ("gemma", "deployments")  # "gemma" covers gemma.access and the engine


def in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()  # raises outside a replica
    except Exception:  # noqa: BLE001 - any failure means "not in a replica"
        return False
    return True


def to_replica_log(names: tuple[str, ...] = OUR_LOGGERS) -> None:
    if not in_serve_replica():
        return
    serve_logger = logging.getLogger(SERVE_LOGGER)
    for name in names:
        logger = logging.getLogger(name)
        for handler in serve_logger.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(serve_logger.level)
        logger.propagate = False  # no second copy through the root logger (on stderr)
