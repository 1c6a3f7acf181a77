"""The gRPC router in front of Triton instances: Triton's own protocol, load-balancing
policies, health, failover, priority admission and metrics. `python -m router --help`."""

__version__ = "0.1.0"
