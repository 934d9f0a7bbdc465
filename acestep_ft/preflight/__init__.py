"""Memory preflight: an analytic estimate of peak device memory (estimate.py), checked against a traced step
(trace.py)."""
