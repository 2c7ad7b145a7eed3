"""The pipeline: a model split into contiguous layer ranges, one per worker, streamed hop by hop.

Owns the assignment a worker is given, the planner (pure: worker memory in, layer ranges out), the
coordinator (deploy, heartbeat, rebalance) and the stage worker (load a shard, serve frames on links).
May import: `net`, `engine`, `data`, the base.
"""
