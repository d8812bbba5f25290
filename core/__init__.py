"""What everything stands on: pure models and logic with no gRPC server imports."""
