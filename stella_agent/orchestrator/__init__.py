"""The reference orchestrator: for development, tests, demos and grpcurl."""
