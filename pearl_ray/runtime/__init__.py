"""The Ray runtime: draft and target-leader workers, the coordinator that creates, places, measures
and restarts them, the transports that carry the draft's messages, and ``RayBackend``."""
