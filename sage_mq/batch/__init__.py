"""Queued inference on rq: the queues and the workers that drain them (JSON only, never pickle)."""

from sage_mq.batch.worker import DEFAULT_QUEUES, make_worker, queue_name, rq_connection

__all__ = ["DEFAULT_QUEUES", "make_worker", "queue_name", "rq_connection"]
