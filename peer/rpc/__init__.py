"""The data plane: tensors <-> protobuf messages, codecs, the stage client, generated stubs."""
