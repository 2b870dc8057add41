"""The dashboard: a live page, JSON and Prometheus ``/metrics``, served by the scheduler.

Off unless asked for (`Config.dashboard_port`, ``trioflow scheduler
--dashboard-port 8787``, ``LocalCluster(dashboard_port=8787)``); it needs
the ``dashboard`` extra (hypercorn, starlette, prometheus-client), which is
imported only when it starts, so ``import trioflow`` never needs it.

It runs in the scheduler's own Trio thread: hypercorn's Trio worker serves
a small Starlette application whose handlers read the scheduler and its
`trioflow.recorder.ClusterRecorder` directly, between two steps of the
scheduler's driver. The core never knows it is there; the shell feeds the
recorder, the dashboard reads it.

======================  ==============================================
module                  what it holds
======================  ==============================================
``server.py``           `serve_dashboard`: binds, serves, reports its URL
``app.py``              the routes, and `Guard`, which every request passes
``auth.py``             the checks `Guard` applies (token, loopback Host)
``state.py``            the JSON the page polls
``metrics.py``          ``/metrics``, from the recorder, at scrape time
``assets.py``           the page and the report, built from ``static/``
======================  ==============================================

docs/dashboard.md is the user's guide.
"""

from trioflow.dashboard.server import DashboardError, serve_dashboard

__all__ = ["DashboardError", "serve_dashboard"]
