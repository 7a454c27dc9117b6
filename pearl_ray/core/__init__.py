"""The pure-torch algorithm core: sampling, verification, the round state machine, messages, the
stop rule, metrics, each side's round work and the one decoding loop. Knows nothing of Ray or transformers."""
