"""Tools around a config or a run: accounting (parameters, FLOPs, memory), the device table,
`jaxlm compile` (AOT for a TPU topology) and `jaxlm plot`."""
