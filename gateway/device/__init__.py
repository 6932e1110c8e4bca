"""The device side, one client library: the protocol on the wire (`protocol`), the device's
credentials and claims (`identity`), the flows as sans-I/O generators and their driver (`flow`; the one-request flow in `flow_one`),
the aiocoap transport (`client`), the field engineer's script (`enroll`), the simulator and the
latency figures (`stats`). The load generator in benchmarks/ drives the same flows over its own
lean transport."""
