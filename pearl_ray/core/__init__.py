"""The pure-torch algorithm core: sampling, verification, the round state machine, messages, the stop rule,
metrics, the speculation policy and the batched decoding loop (``core.batch``) that serves every request.
Knows nothing of Ray or transformers; imports only torch, the standard library, ``errors`` and ``platform``."""
