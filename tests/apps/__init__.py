"""Apps that the acceptance and chaos tests run in worker processes."""
