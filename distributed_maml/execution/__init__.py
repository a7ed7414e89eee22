"""Who computes shards, and where: the shard computer, the step loops and the executor protocol,
in-process / Ray driver / collective executors, CUDA graphs, placement, failover and health.
The only layer that talks to Ray (and every wait on it goes through raywait.py)."""
