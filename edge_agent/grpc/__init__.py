"""The gRPC adapter: generated Open Inference Protocol code, converters and the servicer."""
