"""Real parts for tests and benchmarks alike: processes, a private Redis, a deployment.

Starting the sandbox, Celery workers and a redis-server of one's own (with a
simulated host crash), and a small deployment that submits and collects, live
here once, so that ``tests/`` and ``bench/`` share them and neither reaches
into the other. Nothing here runs in production; none of it imports Celery.
"""
