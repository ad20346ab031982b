"""The worker's HTTP server: the worker API (``/execute`` SSE, ``/cancel``, ``/health``, ``/shutdown``), the
OpenAI-compatible API and ``/metrics``, around one ``Worker`` (model, engine, engine thread, job queue)."""

from orcd.server.app import create_app
from orcd.server.worker import Job, Worker, WorkerConfig

__all__ = ["Job", "Worker", "WorkerConfig", "create_app"]
