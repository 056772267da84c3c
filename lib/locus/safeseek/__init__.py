"""SafeSeek (Yu et al., 2026): differentiable binary masks over heads and neurons (``masks``)
find sparse backdoor and safety circuits (``circuits``, ``backdoor``); tuning only the circuit
steers safety (``circuit_tuning``); ``experiment`` holds what the three notebooks share."""
