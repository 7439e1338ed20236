"""Generated from protos/ by scripts/generate-protos.sh; do not edit."""
