"""A stage peer: the compute runtime, the gRPC servicer, averaging, throughput, lifecycle."""
